"""Token masks and masked log-ratios shared by the losses.

Masked positions (padding, prompt tokens, tokens owned by another loss term) may hold any
finite value. Their log-ratios are zeroed *before* ``exp`` so that a large garbage difference
cannot overflow to ``inf``: ``torch.where`` drops such a value in the forward pass, but its
backward would still multiply 0 by ``inf`` and put NaN into the gradient.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def masked_log_ratio(logprobs: Tensor, base_logprobs: Tensor, mask: Tensor) -> Tensor:
    """``log(pi / pi_base) = logprobs - base_logprobs`` on ``mask``, 0 elsewhere. [batch, seq]"""
    return torch.where(mask, logprobs - base_logprobs, torch.zeros_like(logprobs))


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
