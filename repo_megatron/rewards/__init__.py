"""Rewards: a registry by name (``math``, ``exact``), custom ``module:function`` rewards, and a
process-pool runner that enforces a per-call timeout."""

from .base import REWARDS, RewardRequest, RewardResult, register_reward, resolve_reward
from .runner import RewardRunner

__all__ = ["REWARDS", "RewardRequest", "RewardResult", "RewardRunner", "register_reward",
           "resolve_reward"]
