"""Entropy bonus: a per-token loss term that rewards keeping the policy's entropy up."""

from __future__ import annotations

import torch
from torch import Tensor


def entropy_bonus(entropy: Tensor, mask: Tensor, entropy_coef: float) -> Tensor:
    """``-entropy_coef * H_t`` on ``mask``, 0 elsewhere. [batch, seq]

    ``entropy`` is the per-token entropy of the current policy's next-token distribution
    ``H_t = -sum_v pi(v) log pi(v)`` (the Megatron layer computes it vocab-parallel); the sign
    makes minimising the loss raise the entropy.
    """
    return torch.where(mask, -entropy_coef * entropy, torch.zeros_like(entropy))
