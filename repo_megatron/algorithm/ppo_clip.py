"""Token-level PPO clipped surrogate, with clip-higher and dual-clip (the ``ppo_clip`` loss)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .masking import masked_log_ratio
from .params import LossParams


def clipped_surrogate(log_ratio: Tensor, advantages: Tensor, clip_low: float, clip_high: float,
                      dual_clip: Optional[float] = None) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's pessimistic surrogate as a loss, per token.

    With ``r = exp(log_ratio)``:
    ``loss = max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))``, and for ``A < 0`` with
    dual-clip ``c``: ``loss = min(loss, -A c)`` (Ye et al. 2020: a very large ratio on a
    negative-advantage token cannot produce an unbounded update).

    Inputs ``[batch, seq]``; output: the loss ``[batch, seq]`` and float 0/1 indicators of
    where each bound is the active branch (its gradient is then 0): ``clipfrac_low``
    (``A < 0``, ``r < 1 - clip_low``), ``clipfrac_high`` (``A > 0``, ``r > 1 + clip_high``),
    ``clipfrac_dual`` (``A < 0``, ``-A c < loss``, i.e. ``r > c``).
    """
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    negative = advantages < 0
    indicators = {"clipfrac_low": negative & (ratio < 1 - clip_low),
                  "clipfrac_high": (advantages > 0) & (ratio > 1 + clip_high)}
    if dual_clip is not None:
        dual_bound = -advantages * dual_clip
        dual_active = negative & (dual_bound < loss)
        loss = torch.where(dual_active, dual_bound, loss)
        indicators["clipfrac_dual"] = dual_active
    else:
        indicators["clipfrac_dual"] = torch.zeros_like(negative)
    return loss, {name: flag.to(loss.dtype) for name, flag in indicators.items()}


def ppo_clip_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                  params: LossParams) -> tuple[Tensor, dict[str, Tensor]]:
    """Token-level PPO clip on ``r = pi_theta / pi_old`` (``[batch, seq]`` in and out).

    The log-ratio is clamped to ``[-params.log_ratio_clamp, params.log_ratio_clamp]`` before
    ``exp`` (verl's ``compute_policy_loss_vanilla``; None = no clamp). Per-token metrics (0
    outside ``mask``): the clip indicators of :func:`clipped_surrogate` and ``ppo_kl = log
    pi_old - log pi_theta`` (clamped, as verl's), whose mean estimates KL(pi_old || pi_theta).
    """
    log_ratio = masked_log_ratio(logprobs, old_logprobs, mask,
                                 params.log_ratio_clamp)                    # [batch, seq]
    loss, metrics = clipped_surrogate(log_ratio, advantages, params.clip_low, params.clip_high,
                                      params.dual_clip)
    zeros = torch.zeros_like(loss)
    metrics = {name: torch.where(mask, value, zeros) for name, value in metrics.items()}
    metrics["ppo_kl"] = -log_ratio
    return torch.where(mask, loss, zeros), metrics
