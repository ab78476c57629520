"""When a run stops instead of training on garbage (pure: reads a step's metrics).

Every rank holds the same metrics row (rollout metrics are broadcast, training metrics are
all-reduced), so every rank reaches the same verdict at the same step and stops together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

from ..errors import UserError


class TrainingStopped(UserError, RuntimeError):
    """The run cannot go on usefully; the message is one line naming the cause and the knob.
    The checkpoints it has are kept."""

    exit_code = 1


@dataclass
class RunGuard:
    """``max_nonfinite_steps``: optimizer steps skipped in a row for a NaN/inf loss or gradient
    that stop the run; ``max_failed_reward_steps``: steps in a row in which every reward call
    failed that stop the run (0 = never)."""
    max_nonfinite_steps: int
    max_failed_reward_steps: int
    failed_reward_steps: int = 0

    def check(self, step: int, metrics: Mapping[str, float],
              reward_reason: Optional[str] = None) -> None:
        """Raise :class:`TrainingStopped` if ``step``'s metrics call for it.
        ``reward_reason``: one failed reward's reason, quoted in the message."""
        in_a_row = int(metrics.get("train/nonfinite_in_a_row", 0))
        if in_a_row >= self.max_nonfinite_steps:
            raise TrainingStopped(
                f"step {step}: {in_a_row} optimizer steps in a row had a non-finite loss or "
                f"gradient (optimizer.max_nonfinite_steps={self.max_nonfinite_steps}); they were "
                "skipped and not checkpointed, the last good checkpoint is kept")
        calls = metrics.get("rollout/reward_calls", 0)
        all_failed = calls > 0 and metrics.get("rollout/reward_failures", 0) >= calls
        self.failed_reward_steps = self.failed_reward_steps + 1 if all_failed else 0
        limit = self.max_failed_reward_steps
        if limit and self.failed_reward_steps >= limit:
            why = f"; e.g. {reward_reason}" if reward_reason else ""
            raise TrainingStopped(
                f"step {step}: every reward call failed in {self.failed_reward_steps} steps in "
                f"a row (data.max_failed_reward_steps={limit}){why}")
