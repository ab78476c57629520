"""Dynamic sampling: groups whose rewards are all equal give GRPO no signal; drop them."""

from __future__ import annotations

from typing import Sequence

from .types import Group


def has_reward_variance(group: Group) -> bool:
    """True when the samples GRPO normalises together (after injection; replayed samples have
    their own statistics) do not all have the same reward."""
    rewards = [s.reward for s in group.grpo_samples]
    return max(rewards) > min(rewards)


def informative_groups(groups: Sequence[Group]) -> list[Group]:
    """The groups with reward variance, in order."""
    return [g for g in groups if has_reward_variance(g)]
