"""The synthetic arithmetic task: correct worked solutions, determinism, CLI, shipped files."""

import json
import os
import re

from repo_megatron.data import synthetic
from repo_megatron.rewards.exact import last_boxed

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "data")


def read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_every_step_of_every_solution_is_right_and_ends_in_the_answer():
    for problem in synthetic.generate(60, seed=3):
        for left, right in re.findall(r"(\d+(?: [-+*] \d+)+) = (\d+)", problem["solution"]):
            assert eval(left) == int(right)
        assert last_boxed(problem["solution"]) == problem["answer"]


def test_level1_is_a_plus_b_times_c_with_two_digit_a_b():
    problem = synthetic.level1(__import__("random").Random(0))
    a, b, c = map(int, re.match(r"Compute \((\d+) \+ (\d+)\) \* (\d+)\.", problem["question"]).groups())
    assert 10 <= a <= 99 and 10 <= b <= 99 and int(problem["answer"]) == (a + b) * c


def test_generation_is_deterministic_and_cycles_levels():
    a, b = synthetic.generate(9, seed=1), synthetic.generate(9, seed=1)
    assert a == b and [p["level"] for p in a] == [1, 2, 3] * 3
    assert len({p["question"] for p in synthetic.generate(200, seed=2, levels=(1,))}) == 200


def test_cli_writes_disjoint_train_and_eval_files(tmp_path):
    train, held_out = tmp_path / "t.jsonl", tmp_path / "e.jsonl"
    synthetic.main(["--out", str(train), "--n", "10", "--eval-out", str(held_out),
                    "--n-eval", "5", "--seed", "4", "--levels", "1"])
    train_rows, eval_rows = read(train), read(held_out)
    assert len(train_rows) == 10 and len(eval_rows) == 5
    assert not {r["question"] for r in train_rows} & {r["question"] for r in eval_rows}
    assert train_rows[0]["id"] == "train-0000" and eval_rows[0]["id"] == "eval-0000"


def test_shipped_files_are_what_the_documented_command_makes(tmp_path):
    synthetic.main(["--out", str(tmp_path / "train.jsonl"), "--n", "64",
                    "--eval-out", str(tmp_path / "eval.jsonl"), "--n-eval", "24", "--seed", "0"])
    assert read(tmp_path / "train.jsonl") == read(os.path.join(EXAMPLES, "arith_train.jsonl"))
    assert read(tmp_path / "eval.jsonl") == read(os.path.join(EXAMPLES, "arith_eval.jsonl"))
