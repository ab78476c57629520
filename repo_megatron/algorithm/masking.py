"""Token masks and masked log-ratios shared by the losses.

Masked positions (padding, prompt tokens, tokens owned by another loss term) may hold any
finite value. Their log-ratios are zeroed *before* ``exp`` so that a large garbage difference
cannot overflow to ``inf``: ``torch.where`` drops such a value in the forward pass, but its
backward would still multiply 0 by ``inf`` and put NaN into the gradient. On the mask, a
log-ratio may be clamped to ``[-clamp, clamp]`` (verl's guard, ``algorithm.log_ratio_clamp``):
``exp`` of a real token's log-ratio overflows past 88.7 just the same.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def masked_log_ratio(logprobs: Tensor, base_logprobs: Tensor, mask: Tensor,
                     clamp: Optional[float] = None) -> Tensor:
    """``log(pi / pi_base) = logprobs - base_logprobs`` on ``mask`` (clamped to
    ``[-clamp, clamp]`` unless ``clamp`` is None; no gradient where the clamp binds), 0
    elsewhere. [batch, seq]"""
    log_ratio = logprobs - base_logprobs
    if clamp is not None:
        log_ratio = torch.clamp(log_ratio, min=-clamp, max=clamp)
    return torch.where(mask, log_ratio, torch.zeros_like(logprobs))


def token_mask(flags: Optional[Tensor], response_mask: Tensor) -> Tensor:
    """Per-sequence ``[batch]`` or per-token ``[batch, seq]`` flags as a bool ``[batch, seq]``
    mask within ``response_mask``; all False when ``flags`` is None."""
    if flags is None:
        return torch.zeros_like(response_mask, dtype=torch.bool)
    if flags.dim() == 1:
        flags = flags[:, None]
    return flags.bool() & response_mask.bool()


def per_token(values: Tensor, like: Tensor) -> Tensor:
    """Per-sequence ``[batch]`` values broadcast to ``[batch, seq]`` (per-token ones pass)."""
    return values[:, None].expand_as(like) if values.dim() == 1 else values
