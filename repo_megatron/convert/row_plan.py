"""Turning a mapping's transform into byte copies, by running it on row numbers.

Every layout transform of the families (QKV interleaving, gate/up concatenation, vocabulary
padding and truncation) only selects, reorders or pads whole rows, and is shape-generic. Run on
a 1-D tensor of row ids instead of the weights, the same transform tells which source row
lands in each output row; runs of consecutive ids become byte ranges to copy
(:func:`row_pieces`). The layout logic therefore exists once, in
:mod:`repo_megatron.models.weight_mapping`, and the converters copy bytes without loading
tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from .byte_copy import FileRange, Zeros


@dataclass(frozen=True)
class Segment:
    """Ids ``[first, first + rows)`` of a row index space, stored as consecutive rows of
    ``row_bytes`` each from byte ``offset`` of ``path``."""
    first: int
    rows: int
    path: str
    offset: int


def row_pieces(ids: torch.Tensor, segments: list[Segment], row_bytes: int,
               zero_id: Optional[int] = None) -> list[Union[FileRange, Zeros]]:
    """File ranges (and zero rows) that give, in order, the rows ``ids`` (1-D integers) of
    the index space ``segments`` covers; id ``zero_id`` stands for a row of zeros."""
    ids = ids.reshape(-1).to(torch.int64)
    if ids.numel() == 0:
        return []
    segments = sorted(segments, key=lambda s: s.first)
    firsts = torch.tensor([s.first for s in segments], dtype=torch.int64)
    seg = torch.searchsorted(firsts, ids, right=True) - 1  # segment of each id
    new_run = torch.ones(ids.numel(), dtype=torch.bool)
    new_run[1:] = (ids[1:] != ids[:-1] + 1) | (seg[1:] != seg[:-1])
    starts = torch.nonzero(new_run).flatten().tolist()
    ends = starts[1:] + [ids.numel()]
    pieces: list[Union[FileRange, Zeros]] = []
    for start, end in zip(starts, ends):
        first, count, s = int(ids[start]), end - start, int(seg[start])
        if zero_id is not None and first == zero_id:
            if pieces and isinstance(pieces[-1], Zeros):
                pieces[-1] = Zeros(pieces[-1].nbytes + count * row_bytes)
            else:
                pieces.append(Zeros(count * row_bytes))
            continue
        segment = segments[s] if s >= 0 else None
        if segment is None or first + count > segment.first + segment.rows:
            raise ValueError(f"rows {first}..{first + count - 1} are outside the stored rows")
        pieces.append(FileRange(segment.path, segment.offset + (first - segment.first) * row_bytes,
                                count * row_bytes))
    return pieces
