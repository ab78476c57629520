"""What a run did, in a few lines a new user understands, printed when it ends.

It answers RePO's question from the run's own ``metrics.jsonl``: how many groups failed
entirely (every rollout wrong: GRPO gives them zero advantage, so they contribute no gradient),
how many of those the injection rescued with a verified sample, and whether the policy got
better (held-out solve rate before and after, on-policy reward at the start and the end).
"""

from __future__ import annotations

from typing import Optional

from ..config import Config
from ..metrics.plot import plot_run
from ..metrics.writer import read_rows

RESCUE = {"repo": "a verified rephrase of the reference solution (RePO)",
          "luffy": "the expert's solution itself (LUFFY)"}


def _values(rows: list[dict], key: str) -> list[float]:
    return [r[key] for r in rows if r.get(key) is not None]


def _before_after(values: list[float]) -> str:
    return f"{values[0]:.2f} -> {values[-1]:.2f}" if values else "not measured"


def summary_text(rows: list[dict], injection: str, plot: Optional[str]) -> str:
    """The summary of a run's metric rows (``injection``: ``algorithm.injection``)."""
    steps = [r for r in rows if r.get("step", 0) > 0]
    failed = sum(_values(steps, "rollout/failed_groups"))
    rescued = sum(_values(steps, "rollout/failed_groups_rescued"))
    groups = sum(_values(steps, "rollout/groups"))
    reward = _values(steps, "rollout/reward_onpolicy_mean")
    lines = [
        f"Run summary ({len(steps)} steps, {groups:.0f} groups of rollouts):",
        f"  {failed:.0f} groups failed entirely (every rollout wrong). Plain GRPO gives such a "
        "group zero advantage: no gradient, nothing learned from it.",
        (f"  {rescued:.0f} of those {failed:.0f} got a correct sample injected, "
         f"{RESCUE.get(injection, injection)}, so they did train the policy."
         if injection != "none" else
         "  This run is plain GRPO (algorithm.injection: none): nothing was injected into them."),
        f"  solve rate on the eval prompts (greedy, data.eval_path), before -> after: "
        f"{_before_after(_values(rows, 'eval/solve_rate'))}",
        f"  on-policy reward (sampled, first step -> last step): {_before_after(reward)}",
    ]
    if plot:
        lines.append(f"  curves: {plot}")
    return "\n".join(lines)


def print_run_summary(cfg: Config) -> Optional[str]:
    """Draw the run's curves (``RUN_DIR/metrics.png``) and print the summary; returns it
    (None when the run wrote no metrics)."""
    rows = read_rows(cfg.run_dir)
    if not rows:
        return None
    text = summary_text(rows, cfg.algorithm.injection, plot_run(cfg.run_dir))
    print(text, flush=True)
    return text
