"""The hard-sample ledger over real stage output: histories, rescue, faithfulness, checkpoint
state and an export that a kill cannot tear."""

import json
import os
import signal
import subprocess
import sys

from repo_megatron.metrics.ledger import (HardSampleLedger, ngram_overlap, read_ledger,
                                          summarise)
from repo_megatron.metrics.plot import ledger_curves, plot_run
from tests.rollout.fakes import is_rephrase_prompt, make_stage, prompt

SOLUTION = "First add: 23 + 45 = 68. Then multiply: 68 * 7 = 476. The answer is \\boxed{476}."
HARD = prompt("hard", "Compute (23 + 45) * 7.", "476", solution=SOLUTION)
EASY = prompt("easy", "Compute 2 + 2.", "4", solution="2 + 2 = \\boxed{4}")


class Policy:
    """A scripted policy whose behaviour on the hard prompt changes between steps."""

    def __init__(self):
        self.solves_hard = False
        self.rephrase = SOLUTION                      # verbatim copy of the reference

    def __call__(self, text, rng):
        if is_rephrase_prompt(text):
            return self.rephrase
        if "2 + 2" in text:
            return "\\boxed{4}"
        return "\\boxed{476}" if self.solves_hard and rng.random() < 0.5 else "\\boxed{1}"


def run_steps(policy, steps, ledger):
    stage, _ = make_stage(policy, group_size=4)
    metrics = []
    for step, change in enumerate(steps, start=1):
        change(policy)
        batch = stage.run([HARD, EASY], step=step)
        metrics.append(ledger.record(step, batch.sampled))
    return metrics


def keep(policy):
    pass


def independent_rephrase(policy):
    policy.rephrase = "Sum 23 and 45 to get 68, and seven times sixty-eight gives \\boxed{476}"


def learns_it(policy):
    policy.solves_hard = True


def test_ngram_overlap_is_one_for_a_copy_and_low_for_a_rewrite():
    assert ngram_overlap(SOLUTION, SOLUTION) == 1.0
    rewrite = "Sum 23 and 45 to get 68, and seven times sixty-eight gives \\boxed{476}"
    assert ngram_overlap(rewrite, SOLUTION) < 0.2
    half = "First add: 23 + 45 = 68. Seven sixty-eights make four hundred seventy-six."
    assert 0.2 < ngram_overlap(half, SOLUTION) < 0.8
    assert ngram_overlap("476", SOLUTION) == 1.0       # shorter than n: its unigrams
    assert ngram_overlap("", SOLUTION) == 0.0


def test_a_prompt_gated_then_solved_on_policy_is_rescued():
    ledger = HardSampleLedger(reward_threshold=0.5)
    metrics = run_steps(Policy(), [keep, independent_rephrase, learns_it], ledger)
    hard, easy = ledger.records()
    assert (hard["uid"], easy["uid"]) == ("hard", "easy")
    assert [h["pass_rate"] for h in hard["history"]][:2] == [0.0, 0.0]
    assert hard["history"][2]["pass_rate"] > 0
    assert [h["gate_fired"] for h in hard["history"]] == [True, True, False]
    assert [h["injected"] for h in hard["history"]] == ["rephrase", "rephrase", None]
    assert [h["rephrase_attempts"] for h in hard["history"]] == [1, 1, 0]
    assert hard["first_gate_step"] == 1 and hard["first_injected_step"] == 1
    assert hard["first_solved_step"] == 3 and hard["rescued_step"] == 3
    assert easy["first_solved_step"] == 1 and easy["rescued_step"] is None
    assert easy["first_gate_step"] is None and easy["injections"] == 0
    assert [m["ledger/prompts_rescued"] for m in metrics] == [0.0, 0.0, 1.0]
    assert [m["ledger/prompts_gated"] for m in metrics] == [1.0, 1.0, 1.0]


def test_rephrase_faithfulness_shows_verbatim_copying():
    ledger = HardSampleLedger(reward_threshold=0.5)
    metrics = run_steps(Policy(), [keep, independent_rephrase], ledger)
    hard = ledger.records()[0]
    assert [h["rephrase_overlap"] for h in hard["history"]][0] == 1.0
    assert hard["history"][1]["rephrase_overlap"] < 0.2
    assert metrics[0]["rollout/rephrase_overlap_mean"] == 1.0
    assert metrics[1]["rollout/rephrase_overlap_max"] < 0.2


def test_rescue_needs_a_later_step_than_the_gate():
    history = [{"step": 1, "pass_rate": 0.5, "gate_fired": True, "injected": None,
                "rephrase_attempts": 0, "rephrases_verified": 0}]   # rho < 1: gated and solved
    assert summarise(history)["rescued_step"] is None
    history.append({**history[0], "step": 2, "gate_fired": False})
    assert summarise(history)["rescued_step"] == 2


def test_state_round_trips_and_resumes_exactly():
    full = HardSampleLedger(0.5)
    run_steps(Policy(), [keep, independent_rephrase, learns_it], full)
    first = HardSampleLedger(0.5)
    policy = Policy()
    run_steps(policy, [keep, independent_rephrase], first)
    state = json.loads(json.dumps(first.state()))          # plain JSON types only
    resumed = HardSampleLedger(0.5)
    resumed.load_state(state)
    stage, _ = make_stage(policy, group_size=4)
    learns_it(policy)
    resumed.record(3, stage.run([HARD, EASY], step=3).sampled)
    assert resumed.records() == full.records()


def test_export_writes_one_line_per_prompt(tmp_path):
    ledger = HardSampleLedger(0.5)
    run_steps(Policy(), [keep], ledger)
    path = str(tmp_path / "ledger.jsonl")
    ledger.export(path)
    assert read_ledger(path) == ledger.records()
    assert not os.path.exists(path + ".tmp")


KILLED_EXPORT = """
import sys
from repo_megatron.metrics.ledger import HardSampleLedger
from tests.metrics.test_ledger import Policy, keep, run_steps
ledger = HardSampleLedger(0.5)
run_steps(Policy(), [keep], ledger)
ledger.export(sys.argv[1], step=1)
ledger.record(2, [])
ledger.export(sys.argv[1], step=2)          # killed between writing and renaming
"""


def test_a_kill_mid_export_leaves_the_previous_ledger_whole(tmp_path):
    path = str(tmp_path / "ledger.jsonl")
    env = {**os.environ, "REPO_MEGATRON_FAILPOINT": "ledger_before_replace:2"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, "-c", KILLED_EXPORT, path], env=env, cwd=root,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    records = read_ledger(path)                 # the step-1 ledger, every line whole
    assert [r["uid"] for r in records] == ["hard", "easy"]
    assert os.path.exists(path + ".tmp")        # the step-2 ledger, never renamed into place


def test_plot_draws_the_gated_solved_and_rescued_prompts_over_steps(tmp_path):
    ledger = HardSampleLedger(0.5)
    run_steps(Policy(), [keep, independent_rephrase, learns_it], ledger)
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step in (1, 2, 3):
            f.write(json.dumps({"step": step, "rollout/reward_onpolicy_mean": 0.5}) + "\n")
    without = os.path.getsize(plot_run(str(tmp_path), str(tmp_path / "without.png")))
    ledger.export(str(tmp_path / "ledger.jsonl"))
    assert ledger_curves(read_ledger(str(tmp_path / "ledger.jsonl"))) == {
        "gated": [(1, 1.0), (2, 1.0), (3, 1.0)],
        "solved on-policy": [(1, 1.0), (2, 1.0), (3, 2.0)],
        "rescued": [(1, 0.0), (2, 0.0), (3, 1.0)]}
    with_ledger = plot_run(str(tmp_path))
    with open(with_ledger, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(with_ledger) != without      # a second panel was drawn
