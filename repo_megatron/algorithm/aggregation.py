"""Aggregation of per-token losses into the scalar that is back-propagated.

Contract (what makes the loss independent of the micro-batch and data-parallel layout):
every mode is a *sum over sequences* divided by normalisers that describe the **global**
batch. So if the global batch is cut into micro-batches (on any number of data-parallel
ranks), and each piece is aggregated with the same global :class:`LossNormalisers`, then

    sum over pieces of aggregate_loss(piece, normalisers=global)
        == aggregate_loss(whole batch)

exactly, in value and in gradient. The caller obtains the global normalisers by adding
:meth:`LossNormalisers.from_mask` of every micro-batch and all-reducing (sum) across DP.
A sequence must not be split across pieces (its own token count is used by
``seq-mean-token-mean``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")

Count = Union[Tensor, float, int]


@dataclass(frozen=True)
class LossNormalisers:
    """Denominators of the loss for the whole global batch.

    ``num_tokens``: response tokens (``token-mean``); ``num_sequences``: sequences with at
    least one response token (``seq-mean-*``). Sequences that are fully masked, e.g. padding
    added to even out micro-batches, are not counted, so they change nothing.
    """
    num_tokens: Count
    num_sequences: Count

    @classmethod
    def from_mask(cls, response_mask: Tensor) -> "LossNormalisers":
        """The counts of one micro-batch (``response_mask`` [batch, seq])."""
        mask = response_mask.bool()
        return cls(num_tokens=mask.sum(), num_sequences=mask.any(dim=-1).sum())

    def __add__(self, other: "LossNormalisers") -> "LossNormalisers":
        return LossNormalisers(self.num_tokens + other.num_tokens,
                               self.num_sequences + other.num_sequences)


def _as_denominator(count: Count, like: Tensor) -> Tensor:
    # An empty global batch has a zero numerator too: dividing by 1 keeps the loss at 0.
    return torch.as_tensor(count, dtype=like.dtype, device=like.device).clamp(min=1)


def masked_sum(values: Tensor, mask: Tensor, dim: Optional[int] = None) -> Tensor:
    """Sum of ``values`` where ``mask`` (entries outside the mask are dropped, even NaN)."""
    kept = torch.where(mask.bool(), values, torch.zeros_like(values))
    return kept.sum() if dim is None else kept.sum(dim=dim)


def aggregate_loss(token_loss: Tensor, response_mask: Tensor, mode: str,
                   normalisers: Optional[LossNormalisers] = None,
                   loss_norm_length: Optional[int] = None) -> Tensor:
    """Scalar loss from per-token losses ``[batch, seq]`` over ``response_mask`` ``[batch, seq]``.

    With ``l_it`` the loss of token t of sequence i, ``m_it`` the mask, ``|o_i| = sum_t m_it``,
    and the global counts ``T`` (tokens) and ``S`` (sequences) of ``normalisers``:

    - ``token-mean``:               ``sum_it m_it l_it / T``
    - ``seq-mean-token-mean``:      ``sum_i (sum_t m_it l_it / |o_i|) / S``  (original GRPO)
    - ``seq-mean-token-sum``:       ``sum_i (sum_t m_it l_it) / S``  (verl's: longer responses
      weigh more)
    - ``seq-mean-token-sum-norm``:  ``sum_i (sum_t m_it l_it / L) / S``, ``L =
      loss_norm_length`` (Dr.GRPO: a constant, e.g. the generation budget)

    ``normalisers=None`` means this call sees the whole batch (its own counts). See the module
    docstring for the micro-batch contract.
    """
    if mode not in AGG_MODES:
        raise ValueError(f"loss aggregation mode {mode!r} is unknown "
                         f"(known: {', '.join(AGG_MODES)})")
    normalisers = normalisers or LossNormalisers.from_mask(response_mask)
    if mode == "token-mean":
        num_tokens = _as_denominator(normalisers.num_tokens, token_loss)
        return masked_sum(token_loss, response_mask) / num_tokens
    seq_sum = masked_sum(token_loss, response_mask, dim=-1)                  # [batch]
    if mode == "seq-mean-token-mean":
        seq_len = response_mask.bool().sum(dim=-1).clamp(min=1).to(token_loss.dtype)
        seq_loss = seq_sum / seq_len
    elif mode == "seq-mean-token-sum":
        seq_loss = seq_sum
    else:
        if loss_norm_length is None or loss_norm_length < 1:
            raise ValueError("seq-mean-token-sum-norm needs loss_norm_length >= 1 "
                             f"(got {loss_norm_length})")
        seq_loss = seq_sum / loss_norm_length
    return seq_loss.sum() / _as_denominator(normalisers.num_sequences, token_loss)


def token_mean(values: Tensor, mask: Tensor,
               normalisers: Optional[LossNormalisers] = None) -> Tensor:
    """``sum_masked(values) / T``: a metric that is additive across micro-batches and ranks."""
    normalisers = normalisers or LossNormalisers.from_mask(mask)
    return masked_sum(values, mask) / _as_denominator(normalisers.num_tokens, values)
