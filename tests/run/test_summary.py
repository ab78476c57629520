"""The end-of-run summary: failed groups, rescued ones, solve rate before and after, the plot."""

from repo_megatron.run.summary import summary_text

ROWS = [
    {"step": 0, "eval/solve_rate": 0.0},
    {"step": 1, "rollout/groups": 4.0, "rollout/failed_groups": 3.0,
     "rollout/failed_groups_rescued": 1.0, "rollout/reward_onpolicy_mean": 0.0625},
    {"step": 2, "rollout/groups": 4.0, "rollout/failed_groups": 2.0,
     "rollout/failed_groups_rescued": 2.0, "rollout/reward_onpolicy_mean": 0.25,
     "eval/solve_rate": 0.125},
]


def test_summary_counts_failed_and_rescued_groups_and_says_what_grpo_would_do():
    text = summary_text(ROWS, "repo", "runs/x/metrics.png")
    assert "2 steps, 8 groups" in text
    assert "5 groups failed entirely" in text and "zero advantage" in text
    assert "3 of those 5 got a correct sample injected, a verified rephrase" in text
    assert "before -> after: 0.00 -> 0.12" in text
    assert "0.06 -> 0.25" in text
    assert text.endswith("curves: runs/x/metrics.png")


def test_summary_of_a_run_without_evaluation_says_so():
    rows = [{k: v for k, v in r.items() if k != "eval/solve_rate"} for r in ROWS]
    text = summary_text(rows, "none", None)
    assert "before -> after: not measured" in text
    assert "nothing was injected" in text and "curves" not in text
