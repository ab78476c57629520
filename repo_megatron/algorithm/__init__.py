"""The pure RL algorithm library: group advantages, policy losses, KL, entropy, aggregation.

Plain torch, no Megatron and no I/O; every function works on one micro-batch of
``[batch, seq]`` tensors. Public API and formulas: ``docs/algorithm.md``. Variants (policy
losses, advantage estimators) are registered by name with a decorator; the built-in ones are
imported here so that their names are registered on ``import repo_megatron.algorithm``.
"""

from .advantages import centred_rewards, compute_advantages, drgrpo_advantages, grpo_advantages
from .aggregation import AGG_MODES, LossNormalisers, aggregate_loss, masked_sum, token_mean
from .entropy import entropy_bonus
from .kl import KL_ESTIMATORS, kl_penalty
from .loss import compute_policy_loss
from .luffy import luffy_policy_loss, luffy_policy_shaping
from .params import LossParams
from .ppo_clip import clipped_surrogate, ppo_clip_loss
from .registry import (ADVANTAGE_ESTIMATORS, POLICY_LOSSES, Registry, get_advantage_estimator,
                       get_policy_loss, register_advantage_estimator, register_policy_loss)
from .replay import replay_policy_loss

__all__ = [
    "ADVANTAGE_ESTIMATORS", "AGG_MODES", "KL_ESTIMATORS", "LossNormalisers", "LossParams",
    "POLICY_LOSSES", "Registry", "aggregate_loss", "centred_rewards", "clipped_surrogate",
    "compute_advantages", "compute_policy_loss", "drgrpo_advantages", "entropy_bonus",
    "get_advantage_estimator", "get_policy_loss", "grpo_advantages", "kl_penalty",
    "luffy_policy_loss", "luffy_policy_shaping", "masked_sum", "ppo_clip_loss",
    "register_advantage_estimator", "register_policy_loss", "replay_policy_loss", "token_mean",
]
