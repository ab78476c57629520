"""The pure RL algorithm library: group advantages, policy losses, KL, entropy, aggregation.

Plain torch, no Megatron and no I/O; every function works on one micro-batch of
``[batch, seq]`` tensors. Public API and formulas: ``docs/algorithm.md``. Variants (policy
losses, advantage estimators) are registered by name in :mod:`.registry`, which the config
reads without torch: importing this package loads none of its submodules, each name below is
imported on first use.
"""

from __future__ import annotations

from ..lazy_exports import lazy_getattr

_EXPORTS = {
    "centred_rewards": ".advantages", "compute_advantages": ".advantages",
    "drgrpo_advantages": ".advantages", "grpo_advantages": ".advantages",
    "AGG_MODES": ".aggregation", "LossNormalisers": ".aggregation",
    "aggregate_loss": ".aggregation", "masked_sum": ".aggregation", "token_mean": ".aggregation",
    "entropy_bonus": ".entropy",
    "KL_ESTIMATORS": ".kl", "kl_penalty": ".kl",
    "compute_policy_loss": ".loss",
    "luffy_policy_loss": ".luffy", "luffy_policy_shaping": ".luffy",
    "LossParams": ".params",
    "clipped_surrogate": ".ppo_clip", "ppo_clip_loss": ".ppo_clip",
    "ADVANTAGE_ESTIMATORS": ".registry", "POLICY_LOSSES": ".registry",
    "get_advantage_estimator": ".registry", "get_policy_loss": ".registry",
    "register_advantage_estimator": ".registry", "register_policy_loss": ".registry",
    "replay_policy_loss": ".replay",
}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
