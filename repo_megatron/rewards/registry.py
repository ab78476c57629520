"""The rewards by name (``data.reward``): one file each, one line here.

A reward is ``fn(response: str, answer: str, question: str)`` returning a number (or bool), a
``(value, reason)`` pair or a :class:`~.base.RewardResult`. This module imports none of them:
the config reads the names, and the reward workers import only the one they run.
"""

from __future__ import annotations

from typing import Any, Callable

from ..registry import Registry

RewardFn = Callable[[str, str, str], Any]

REWARDS: Registry[RewardFn] = Registry("reward", "data.reward", {
    "math": "repo_megatron.rewards.math_answer:math_reward",
    "exact": "repo_megatron.rewards.exact:exact_reward",
})
