"""Pure tensor transforms between Hugging Face and Megatron-Core weight layouts.

Every function is shape-generic (weights ``[rows, hidden]`` and biases ``[rows]`` alike) and
works on ``meta`` tensors, which the converters use to plan shapes before reading any data.
"""

from __future__ import annotations

import torch


def interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   num_query_groups: int) -> torch.Tensor:
    """Megatron's fused QKV rows: per query group ``g``, ``[q heads of g; k_g; v_g]``.

    q: [heads * head_dim, ...], k and v: [groups * head_dim, ...] -> [(heads + 2 * groups) *
    head_dim, ...]. Grouping by query group is what lets TP split the fused tensor by rows."""
    rest = q.shape[1:]
    q = q.reshape(num_query_groups, -1, *rest)  # [groups, heads/groups * head_dim, ...]
    k = k.reshape(num_query_groups, -1, *rest)  # [groups, head_dim, ...]
    v = v.reshape(num_query_groups, -1, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, num_attention_heads: int, num_query_groups: int,
              head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of :func:`interleave_qkv`: (q, k, v) in Hugging Face's row order."""
    rest = qkv.shape[1:]
    q_rows = num_attention_heads // num_query_groups * head_dim
    grouped = qkv.reshape(num_query_groups, q_rows + 2 * head_dim, *rest)
    q, k, v = grouped.split([q_rows, head_dim, head_dim], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def split_gate_up(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate, up) of a global Megatron ``linear_fc1`` weight ``cat(gate, up)``."""
    gate, up = fc1.chunk(2, dim=0)
    return gate, up


def merge_tp_gate_up(shards: list[torch.Tensor]) -> torch.Tensor:
    """The global ``cat(gate, up)`` from the ``linear_fc1`` shards of TP ranks ``i``, each of
    which holds ``[gate_i; up_i]`` (what a plain row concatenation would get wrong)."""
    halves = [s.chunk(2, dim=0) for s in shards]
    return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)


def pad_vocab_rows(weight: torch.Tensor, padded_vocab_size: int) -> list[torch.Tensor]:
    """``weight`` [vocab, hidden] padded with zero rows to ``padded_vocab_size``, as row pieces
    ``[weight, zeros]`` (kept apart so that the original rows are never copied)."""
    extra = padded_vocab_size - weight.shape[0]
    if extra < 0:
        raise ValueError(f"vocabulary of {weight.shape[0]} rows exceeds the padded size "
                         f"{padded_vocab_size}")
    if extra == 0:
        return [weight]
    return [weight, weight.new_zeros(extra, *weight.shape[1:])]


def truncate_vocab_rows(weight: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The first ``vocab_size`` rows of a padded embedding / output layer (a view)."""
    return weight[:vocab_size]
