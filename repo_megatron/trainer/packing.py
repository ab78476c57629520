"""Sequence packing: a micro-batch's sequences as one row of the model (plain torch, and
megatron-core's ``PackedSeqParams``).

A packed micro-batch (:attr:`~.micro_batch.MicroBatch.pack_length`) holds ``b`` sequences of
``lengths[i]`` real tokens in the loss's layout ``[b, s]``; the model sees their real tokens
one after the other in a row of ``pack_length`` positions, the positions past the last one
padding (a segment of its own, so that every position belongs to one)::

    row:         | seq 0 (l0) | seq 1 (l1) | ... | padding |
    cu_seqlens:  0            l0           l0+l1 ...  total  pack_length
    position_ids 0 1 .. l0-1  0 1 .. l1-1  ...    0 1 ...

:class:`PackedLayout` is that map, computed on the host (no device sync: the forward step
builds it from the host micro-batch). Attention must not cross a boundary:

- Transformer Engine takes the boundaries as ``PackedSeqParams(qkv_format="thd",
  cu_seqlens_q=cu_seqlens_kv=cu_seqlens)`` (:func:`packed_seq_params`) with no mask; its rotary
  embedding restarts at each boundary too.
- The local spec (megatron's ``DotProductAttention``, which refuses ``PackedSeqParams``) takes
  an explicit block-diagonal causal mask (:func:`block_diagonal_causal_mask`). Its rotary
  embedding numbers the row's positions 0..T-1 without restarting; attention scores under RoPE
  depend only on the distance between query and key, so this is the same function up to the
  rounding of the larger angles (tests/trainer/test_packing.py measures it).

:func:`pack` puts any ``[b, s, ...]`` tensor into the row, :func:`unpack` takes the row's
values (the log-probs) back to ``[b, s, ...]``, zeros elsewhere; both are differentiable.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class PackedLayout:
    """Where each real token of a ``[b, s]`` micro-batch sits in its packed row."""
    rows: Tensor        # [total] long: the sequence (row of [b, s]) of each packed position
    cols: Tensor        # [total] long: its position in that sequence
    cu_seqlens: Tensor  # [k + 1] int32: segment boundaries (non-empty sequences, then padding)
    max_seqlen: int     # the longest segment
    length: int         # positions of the row (pack_length)

    @property
    def total(self) -> int:
        """Real tokens in the row."""
        return self.rows.numel()

    def to(self, device: torch.device) -> "PackedLayout":
        return PackedLayout(self.rows.to(device), self.cols.to(device),
                            self.cu_seqlens.to(device), self.max_seqlen, self.length)


def packed_layout(lengths: Tensor, length: int) -> PackedLayout:
    """The layout of sequences of ``lengths`` ([b], host) in a row of ``length`` positions;
    sequences of length 0 (padding rows) take no position."""
    lengths = lengths.long().cpu()
    seq = int(lengths.max()) if lengths.numel() else 0
    real = torch.arange(seq) < lengths[:, None]                              # [b, s]
    rows, cols = real.nonzero(as_tuple=True)                                 # row-major
    total = rows.numel()
    if total > length:
        raise ValueError(f"{total} tokens do not fit a packed row of {length} positions")
    segments = [int(n) for n in lengths if n > 0] + ([length - total] if length > total else [])
    cu = torch.tensor([0, *segments], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return PackedLayout(rows, cols, cu, max(segments, default=0), length)


def pack(values: Tensor, layout: PackedLayout) -> Tensor:
    """``values`` [b, s, ...] as one packed row [1, length, ...] (zeros at the padding)."""
    out = values.new_zeros((1, layout.length, *values.shape[2:]))
    out[0, :layout.total] = values[layout.rows, layout.cols]
    return out


def unpack(packed: Tensor, layout: PackedLayout, shape: torch.Size) -> Tensor:
    """The row ``packed`` [1, length, ...] back to ``shape`` [b, s, ...] (zeros outside the
    sequences); differentiable."""
    out = packed.new_zeros((*shape, *packed.shape[2:]))
    return out.index_put((layout.rows, layout.cols), packed[0, :layout.total])


def segment_ids(layout: PackedLayout) -> Tensor:
    """[length] long: the segment each position of the row belongs to."""
    positions = torch.arange(layout.length, device=layout.cu_seqlens.device)
    return torch.searchsorted(layout.cu_seqlens[1:].long(), positions, right=True)


def position_ids(layout: PackedLayout) -> Tensor:
    """[1, length] long: positions restarting at 0 at each segment."""
    starts = layout.cu_seqlens.long()[segment_ids(layout)]
    return (torch.arange(layout.length, device=starts.device) - starts)[None]


def block_diagonal_causal_mask(layout: PackedLayout) -> Tensor:
    """Megatron's boolean mask [1, 1, T, T] (True = masked) for the row: a query sees the keys
    of its own segment up to itself."""
    seg = segment_ids(layout)
    pos = torch.arange(layout.length, device=seg.device)
    masked = (seg[:, None] != seg[None, :]) | (pos[None, :] > pos[:, None])
    return masked.view(1, 1, layout.length, layout.length)


def packed_seq_params(layout: PackedLayout):
    """Megatron's ``PackedSeqParams`` in the THD format for Transformer Engine's attention
    and rotary embedding (``cu_seqlens`` on the layout's device)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=layout.cu_seqlens,
                           cu_seqlens_kv=layout.cu_seqlens, max_seqlen_q=layout.max_seqlen,
                           max_seqlen_kv=layout.max_seqlen)
