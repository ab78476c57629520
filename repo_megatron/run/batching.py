"""Which sequences of a step run together, and in what shape (pure python, no torch).

A *plan* says, for every data-parallel rank, which of the step's sequences each of its
micro-batches holds and the shape it runs in (:class:`PlannedMicroBatch`). Two ways to make one:

- :func:`fixed_plan`: ``micro_batch_size`` sequences per micro-batch, in rollout order, each DP
  rank a contiguous slice (the layout before token budgets; memory depends on the longest
  sequence a micro-batch happens to draw).
- :func:`token_budget_plan`: the sequences are spread over the DP ranks by tokens
  (:func:`balance_by_tokens`, Karmarkar-Karp), then each rank's are sorted by length and binned
  so that no micro-batch computes more than ``max_tokens`` positions (rows x padded length, or
  the packed row). Packed rows are filled first-fit decreasing (padding only to the length
  multiple). Unpacked, the micro-batches are runs of the length-sorted sequences, chosen
  (:func:`cheapest_runs`) to minimise the computed positions plus ``overhead`` positions per
  micro-batch: without that price every distinct length would run alone, which on a GPU wastes
  more than a little padding does. A sequence longer than the budget runs alone (or is an
  error with ``strict``).

Both give every rank the same number of micro-batches (a multiple of ``multiple_of``: the
interleaved schedule's pipeline size): Megatron runs a collective per micro-batch wherever a
layer spans ranks of the DP group (expert parallelism's all-to-all), and the interleaved
schedule needs the multiple. With ``equal_shapes`` (the interleaved schedule at PP=2, where
megatron's shape exchange needs one shape per run: :func:`repo_megatron.trainer.forward.
needs_equal_shapes`) every micro-batch of a rank runs in that rank's largest shape, and the
budget plan sizes its micro-batches for that.

The computed positions of a micro-batch (:attr:`PlannedMicroBatch.tokens`) are what it costs in
activation memory and compute; the loss does not depend on the plan
(:mod:`repo_megatron.trainer.loss`).
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, replace
from typing import Optional, Sequence

from ..errors import ConfigError

# A sequence needs two positions to score a token (position t scores token t + 1).
MIN_POSITIONS = 2


@dataclass(frozen=True)
class PlannedMicroBatch:
    """One micro-batch of a plan: which sequences it holds and the shape it runs in."""
    sequences: tuple[int, ...]  # indices into the step's (mini-)batch, longest first
    rows: int                   # rows it runs with, padding rows included (1 when packed)
    length: int                 # positions per row: the padded longest, or the packed row
    packed: bool = False        # the sequences share one row (trainer/packing.py)

    @property
    def tokens(self) -> int:
        """Positions it computes (real tokens and padding)."""
        return self.rows * self.length


Plan = list[list[PlannedMicroBatch]]  # [DP rank] -> that rank's micro-batches, in order


def padded_length(length: int, multiple: int) -> int:
    """``length`` rounded up to a multiple of ``multiple``."""
    return -(-length // multiple) * multiple


def row_length(lengths: Sequence[int], multiple: int, packed: bool) -> int:
    """Positions of one row holding ``lengths``: the longest (unpacked: every row is padded to
    it) or their sum (packed), at least :data:`MIN_POSITIONS`, rounded up to ``multiple`` (what
    sequence parallelism and FP8 need: :func:`repo_megatron.models.builder.
    sequence_length_multiple`)."""
    longest = sum(lengths) if packed else max(lengths, default=0)
    return padded_length(max(MIN_POSITIONS, longest), multiple)


def planned(sequences: Sequence[int], lengths: Sequence[int], multiple: int, packed: bool,
            rows: Optional[int] = None) -> PlannedMicroBatch:
    """The micro-batch holding ``sequences`` (an empty one runs one padding row)."""
    own = [lengths[i] for i in sequences]
    return PlannedMicroBatch(tuple(sequences),
                             1 if packed else max(1, len(sequences) if rows is None else rows),
                             row_length(own, multiple, packed), packed)


def fixed_plan(lengths: Sequence[int], data_parallel_size: int, micro_batch_size: int,
               multiple: int = 1, packed: bool = False, multiple_of: int = 1,
               equal_shapes: bool = False) -> Plan:
    """``micro_batch_size`` sequences per micro-batch in rollout order, rank ``r`` taking the
    ``r``-th contiguous share; the last shares are filled with padding rows so that every rank
    runs the same number of full micro-batches (a multiple of ``multiple_of``)."""
    n = len(lengths)
    micro = math.ceil(math.ceil(n / data_parallel_size) / micro_batch_size)
    micro = max(1, math.ceil(micro / multiple_of) * multiple_of)
    per_rank = micro * micro_batch_size
    plan = []
    for rank in range(data_parallel_size):
        mine = []
        for k in range(micro):
            start = rank * per_rank + k * micro_batch_size
            seqs = range(min(start, n), min(start + micro_batch_size, n))
            mine.append(planned(seqs, lengths, multiple, packed, rows=micro_batch_size))
        plan.append(mine)
    return _equal_shapes(plan) if equal_shapes else plan


def token_budget_plan(lengths: Sequence[int], data_parallel_size: int, max_tokens: int,
                      multiple: int = 1, packed: bool = False, multiple_of: int = 1,
                      equal_shapes: bool = False, strict: bool = False,
                      overhead: int = 0) -> Plan:
    """Micro-batches of at most ``max_tokens`` computed positions, balanced over the DP ranks
    by tokens (module docstring). ``strict``: a sequence that cannot fit the budget alone is a
    :class:`~repo_megatron.errors.ConfigError` instead of a micro-batch of its own.
    ``overhead``: what one more unpacked micro-batch costs, in positions (0: only padding
    counts)."""
    if strict:
        _check_fits(lengths, max_tokens, multiple, packed)
    shares = balance_by_tokens(lengths, data_parallel_size)
    bins = [_bins(share, lengths, max_tokens, multiple, packed, equal_shapes, overhead)
            for share in shares]
    count = max(1, max(len(b) for b in bins))
    count = math.ceil(count / multiple_of) * multiple_of
    plan = [[planned(b, lengths, multiple, packed) for b in _split_to(rank_bins, count)]
            for rank_bins in bins]
    return _equal_shapes(plan) if equal_shapes else plan


def plan_micro_batches(lengths: Sequence[int], data_parallel_size: int, algorithm,
                       multiple: int = 1, multiple_of: int = 1,
                       equal_shapes: bool = False) -> Plan:
    """The plan the ``algorithm:`` section asks for: :func:`token_budget_plan` with
    ``max_tokens_per_microbatch``, :func:`fixed_plan` of ``micro_batch_size`` without; packed
    with ``sequence_packing``."""
    shape = dict(multiple=multiple, packed=algorithm.sequence_packing, multiple_of=multiple_of,
                 equal_shapes=equal_shapes)
    if algorithm.max_tokens_per_microbatch is None:
        return fixed_plan(lengths, data_parallel_size, algorithm.micro_batch_size, **shape)
    return token_budget_plan(lengths, data_parallel_size, algorithm.max_tokens_per_microbatch,
                             strict=algorithm.strict_token_budget,
                             overhead=algorithm.microbatch_overhead_tokens, **shape)


def balance_by_tokens(lengths: Sequence[int], parts: int) -> list[list[int]]:
    """Indices of ``lengths`` in ``parts`` sets whose token sums are as even as the largest
    differencing method (Karmarkar-Karp) makes them; heaviest set first, each set in index
    order. Deterministic: ties go by index."""
    if parts == 1:
        return [list(range(len(lengths)))]
    # A partial partition: `parts` (sum, indices) sets, heaviest first; the heap takes the one
    # with the largest spread first and merges it with the next, heaviest set with lightest.
    heap = [(-length, i, [(length, [i])] + [(0, [])] * (parts - 1))
            for i, length in enumerate(lengths)]
    heapq.heapify(heap)
    counter = len(heap)
    while len(heap) > 1:
        _, _, a = heapq.heappop(heap)
        _, _, b = heapq.heappop(heap)
        merged = sorted(((sa + sb, ia + ib) for (sa, ia), (sb, ib) in zip(a, reversed(b))),
                        key=lambda s: (-s[0], min(s[1], default=len(lengths))))
        heapq.heappush(heap, (merged[-1][0] - merged[0][0], counter, merged))
        counter += 1
    sets = heap[0][2] if heap else [(0, [])] * parts
    return [sorted(indices) for _, indices in sets]


def _check_fits(lengths: Sequence[int], max_tokens: int, multiple: int, packed: bool) -> None:
    for i, length in enumerate(lengths):
        need = row_length([length], multiple, packed)
        if need > max_tokens:
            raise ConfigError(
                f"algorithm.max_tokens_per_microbatch={max_tokens}: sequence {i} of the step "
                f"has {length} tokens ({need} positions padded); raise the budget, shorten "
                "rollout.max_new_tokens, or set algorithm.strict_token_budget=false to run it "
                "in a micro-batch of its own")


def cheapest_runs(sorted_lengths: Sequence[int], max_tokens: int, multiple: int,
                  overhead: int) -> list[int]:
    """Where to cut lengths sorted longest first into consecutive runs (the start of each run)
    so that the runs' computed positions (rows x the first's padded length) plus ``overhead``
    per run are smallest, no run above ``max_tokens`` unless one sequence alone is. Dynamic
    programming over the cut points: ``O(n x rows a micro-batch may hold)``."""
    n = len(sorted_lengths)
    cost = [0] + [math.inf] * n          # cost[j]: cheapest runs of the first j sequences
    start = [0] * (n + 1)                # start[j]: where the last of those runs starts
    for i in range(n):
        per_row = row_length([sorted_lengths[i]], multiple, False)
        for j in range(i + 1, min(n, i + max(1, max_tokens // per_row)) + 1):
            c = cost[i] + (j - i) * per_row + overhead
            if c < cost[j]:
                cost[j], start[j] = c, i
    cuts, j = [], n
    while j > 0:
        j = start[j]
        cuts.append(j)
    return cuts[::-1]


def _bins(share: Sequence[int], lengths: Sequence[int], max_tokens: int, multiple: int,
          packed: bool, equal_shapes: bool, overhead: int) -> list[list[int]]:
    """One rank's sequences in micro-batches of at most ``max_tokens`` positions, longest
    first. Packed: first-fit decreasing into rows of at most ``max_tokens``. Unpacked: the
    :func:`cheapest_runs` of the length-sorted sequences; with ``equal_shapes`` every row is
    padded to the rank's longest anyway, so runs of as many rows as fit."""
    order = sorted(share, key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    if packed:
        totals: list[int] = []
        for i in order:
            for k, total in enumerate(totals):
                if row_length([total + lengths[i]], multiple, True) <= max_tokens:
                    bins[k].append(i)
                    totals[k] += lengths[i]
                    break
            else:
                bins.append([i])
                totals.append(lengths[i])
        return bins
    if not order:
        return bins
    if equal_shapes:
        rows = max(1, max_tokens // row_length([lengths[order[0]]], multiple, False))
        return [order[k:k + rows] for k in range(0, len(order), rows)]
    cuts = cheapest_runs([lengths[i] for i in order], max_tokens, multiple, overhead)
    return [order[a:b] for a, b in zip(cuts, [*cuts[1:], len(order)])]


def _split_to(bins: list[list[int]], count: int) -> list[list[int]]:
    """``bins`` made ``count`` by halving the fullest (a split never adds padding) and, when
    none has two sequences left, adding empty ones."""
    bins = [list(b) for b in bins]
    while len(bins) < count:
        k = max(range(len(bins)), key=lambda j: (len(bins[j]), -j), default=None)
        if k is None or len(bins[k]) < 2:
            bins.append([])
            continue
        half = math.ceil(len(bins[k]) / 2)
        bins[k:k + 1] = [bins[k][:half], bins[k][half:]]
    return bins


def _equal_shapes(plan: Plan) -> Plan:
    """Every micro-batch of a rank in that rank's largest shape (the rows and the length)."""
    out = []
    for mine in plan:
        rows, length = max(p.rows for p in mine), max(p.length for p in mine)
        out.append([replace(p, rows=rows, length=length) for p in mine])
    return out


def plan_metrics(plans: Sequence[Plan], lengths: Sequence[Sequence[int]]) -> dict[str, float]:
    """What the plans of a step's mini-batches cost: ``padding_share`` (padded positions /
    computed positions), ``dp_imbalance`` (the busiest rank's computed positions over the
    mean), the largest micro-batch and the micro-batches per rank."""
    computed = [0] * len(plans[0])
    real, largest, micro = 0, 0, 0
    for plan, own in zip(plans, lengths):
        real += sum(own)
        micro += len(plan[0])
        for rank, mine in enumerate(plan):
            computed[rank] += sum(p.tokens for p in mine)
            largest = max([largest, *(p.tokens for p in mine)])
    total = sum(computed)
    return {"padding_share": 1 - real / total if total else 0.0,
            "dp_imbalance": max(computed) / (total / len(computed)) if total else 1.0,
            "max_microbatch_tokens": float(largest), "microbatches_per_rank": float(micro)}
