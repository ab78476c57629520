"""A synthetic hard-sample task with worked solutions: multi-step integer arithmetic.

Each problem has a reference answer and a step-by-step expert solution ending in ``\\boxed{}``
(the off-policy knowledge ``k`` RePO rephrases). Levels grow in steps:

1. ``Compute (a + b) * c`` with two-digit a, b (SmolLM2-135M-Instruct solves ~0/24 of these on
   its own, ~3/24 when it rephrases the reference solution: where RePO helps);
2. ``Compute (a + b) * c - d``;
3. a three-step word problem (rows x columns x yield, minus what was sold).

    python -m repo_megatron.data.synthetic --out examples/data/arith_train.jsonl --n 64 \\
        --eval-out examples/data/arith_eval.jsonl --n-eval 24 --seed 0
"""

from __future__ import annotations

import argparse
import json
import os
import random
from typing import Callable

INSTRUCTION = "Put the final answer in \\boxed{}."

Problem = dict  # {"level", "question", "answer", "solution"}


def level1(rng: random.Random) -> Problem:
    """(a + b) * c with two-digit a, b and one-digit c."""
    a, b, c = rng.randint(10, 99), rng.randint(10, 99), rng.randint(3, 9)
    s = a + b
    return {"level": 1, "question": f"Compute ({a} + {b}) * {c}. {INSTRUCTION}",
            "answer": str(s * c),
            "solution": f"First add the numbers in parentheses: {a} + {b} = {s}.\n"
                        f"Then multiply: {s} * {c} = {s * c}.\n"
                        f"The answer is \\boxed{{{s * c}}}."}


def level2(rng: random.Random) -> Problem:
    """(a + b) * c - d."""
    a, b, c, d = rng.randint(10, 99), rng.randint(10, 99), rng.randint(3, 9), rng.randint(10, 99)
    s, p = a + b, (a + b) * c
    return {"level": 2, "question": f"Compute ({a} + {b}) * {c} - {d}. {INSTRUCTION}",
            "answer": str(p - d),
            "solution": f"First add the numbers in parentheses: {a} + {b} = {s}.\n"
                        f"Then multiply: {s} * {c} = {p}.\n"
                        f"Finally subtract: {p} - {d} = {p - d}.\n"
                        f"The answer is \\boxed{{{p - d}}}."}


def level3(rng: random.Random) -> Problem:
    """Rows x trees x apples per tree, minus apples sold: a three-step word problem."""
    rows, per_row, apples, sold = (rng.randint(3, 12), rng.randint(4, 15), rng.randint(6, 20),
                                   rng.randint(10, 99))
    trees, total = rows * per_row, rows * per_row * apples
    return {"level": 3,
            "question": f"An orchard has {rows} rows of {per_row} apple trees. Each tree gives "
                        f"{apples} apples. The farmer sells {sold} apples. How many apples are "
                        f"left? {INSTRUCTION}",
            "answer": str(total - sold),
            "solution": f"Number of trees: {rows} * {per_row} = {trees}.\n"
                        f"Apples picked: {trees} * {apples} = {total}.\n"
                        f"Apples left after selling: {total} - {sold} = {total - sold}.\n"
                        f"The answer is \\boxed{{{total - sold}}}."}


LEVELS: dict[int, Callable[[random.Random], Problem]] = {1: level1, 2: level2, 3: level3}


def generate(n: int, seed: int, levels: tuple[int, ...] = (1, 2, 3),
             exclude: frozenset[str] = frozenset()) -> list[Problem]:
    """``n`` distinct problems (none whose question is in ``exclude``), levels in turn."""
    rng = random.Random(seed)
    problems, seen = [], set(exclude)
    while len(problems) < n:
        problem = LEVELS[levels[len(problems) % len(levels)]](rng)
        if problem["question"] not in seen:
            seen.add(problem["question"])
            problems.append(problem)
    return problems


def write_jsonl(path: str, problems: list[Problem], prefix: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i, problem in enumerate(problems):
            f.write(json.dumps({"id": f"{prefix}-{i:04d}", **problem}) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="train jsonl to write")
    parser.add_argument("--n", type=int, default=64, help="train problems")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 2, 3], choices=sorted(LEVELS))
    parser.add_argument("--eval-out", help="held-out jsonl (no question shared with --out)")
    parser.add_argument("--n-eval", type=int, default=24, help="held-out problems")
    args = parser.parse_args(argv)
    train = generate(args.n, args.seed, tuple(args.levels))
    write_jsonl(args.out, train, "train")
    if args.eval_out:
        held_out = generate(args.n_eval, args.seed + 1, tuple(args.levels),
                            exclude=frozenset(p["question"] for p in train))
        write_jsonl(args.eval_out, held_out, "eval")


if __name__ == "__main__":
    main()
