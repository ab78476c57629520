"""Replay-Enhanced Policy Optimization's off-policy term (Li et al. 2025, arXiv 2506.09340).

Replayed responses come from a per-prompt buffer together with the log-probs of the policy
that sampled them (the behaviour policy). Their loss is the PPO clipped surrogate on the
importance ratio ``r = pi_theta / pi_behaviour``, so samples the current policy would no longer
produce are down-weighted, times the coefficient of the off-policy term.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .masking import masked_log_ratio
from .ppo_clip import clipped_surrogate


def replay_policy_loss(logprobs: Tensor, behaviour_logprobs: Tensor, advantages: Tensor,
                       mask: Tensor, clip: float, coef: float,
                       log_ratio_clamp: Optional[float] = None) -> tuple[Tensor, dict[str, Tensor]]:
    """``coef * max(-A r, -A clip(r, 1 - clip, 1 + clip))`` on the replayed tokens ``mask``.

    ``log r`` is clamped to ``[-log_ratio_clamp, log_ratio_clamp]`` before ``exp`` (None = no
    clamp): the behaviour policy may be many steps old, so ``r`` strays further than PPO's.
    Inputs ``[batch, seq]``; output: the loss ``[batch, seq]`` (0 outside ``mask``) and
    per-token metrics: ``replay_token_frac`` (1 on these tokens), ``replay_clipfrac`` (the clip
    is active) and ``replay_ratio`` (``r``; divide its token-mean by ``replay_token_frac`` for
    the mean ratio).
    """
    log_ratio = masked_log_ratio(logprobs, behaviour_logprobs, mask,
                                 log_ratio_clamp)                          # [batch, seq]
    loss, clipped = clipped_surrogate(log_ratio, advantages, clip, clip)
    zeros = torch.zeros_like(loss)
    metrics = {"replay_token_frac": mask.to(loss.dtype),
               "replay_clipfrac": torch.where(mask, clipped["clipfrac_low"]
                                              + clipped["clipfrac_high"], zeros),
               "replay_ratio": torch.where(mask, torch.exp(log_ratio), zeros)}
    return torch.where(mask, coef * loss, zeros), metrics
