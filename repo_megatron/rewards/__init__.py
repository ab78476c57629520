"""Rewards: a registry by name (``math``, ``exact``), custom ``module:function`` rewards, and a
process-pool runner that enforces a per-call timeout. Importing this package loads none of its
submodules: each name below is imported on first use."""

from __future__ import annotations

from ..lazy_exports import lazy_getattr

_EXPORTS = {"REWARDS": ".registry", "RewardRequest": ".base", "RewardResult": ".base",
            "resolve_reward": ".base", "RewardRunner": ".runner"}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
