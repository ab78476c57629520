"""This rank's Megatron parameters as full Hugging Face tensors, for weight sync.

:class:`HFExport` reads the model chunks' sharded state dicts once: they give each parameter
its checkpoint key (hence its :class:`~repo_megatron.models.weight_mapping.ParamMapping`), its
TP split dimension and, for layer keys, its *global* layer number (Megatron adds the PP /
virtual-PP layer offset there). Every sync then only walks that plan: it gathers TP shards
over the tensor-parallel group into one buffer per parameter, rebuilds the global tensor with
the mapping's ``merge_tp`` (``linear_fc1`` through
:func:`~repo_megatron.models.weight_mapping.merge_tp_gate_up`) and maps it to HF names with the
same family mapping the converters use. Collective over the TP group: every TP rank of a
pipeline stage must iterate it, and each gets the same tensors; which rank sends them to the
rollout engine is the sync strategy's choice.

Copies, per parameter: the all-gather writes the shards into one ``[tp * rows, ...]`` buffer,
which *is* the global tensor of a parameter split by rows (QKV, embedding, output layer), so
nothing is concatenated after it; a column split (``linear_proj``, ``linear_fc2``) or the
per-rank ``[gate_i; up_i]`` of ``linear_fc1`` takes one copy to the global layout; the layout
transforms (``to_hf``) return views where they can (fused QKV is split into three copies).
Unsharded tensors and everything at TP 1 except QKV reach the caller as views of the
parameters: consumers must not write into them.

FP8 weights (``model.fp8_param_gather``: Transformer Engine ``QuantizedTensor`` parameters) are
dequantized to the model's params dtype before the gather (:func:`high_precision`): SGLang and
Hugging Face take bf16, and each TP rank's shard has its own scales, so raw FP8 bytes gathered
from several ranks would not even be one tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from ..errors import ConversionError
from ..models.architecture import Architecture
from ..models.weight_mapping import ModelDims, ParamMapping, concatenate_shards, mappings_for

# torch 2.13 renamed all_gather_into_tensor (kept as a deprecated alias); older torch has only
# the old name.
_all_gather_into = (getattr(torch.distributed, "all_gather_single", None)
                    or torch.distributed.all_gather_into_tensor)


@dataclass(frozen=True)
class TPGroup:
    """The tensor-parallel group a gather runs over: its handle, size, this rank's index and
    the members' global ranks, and whether its backend is gloo."""
    group: object
    size: int
    rank: int
    global_ranks: tuple[int, ...]
    gloo: bool

    @classmethod
    def current(cls) -> "TPGroup":
        from megatron.core import parallel_state

        group = parallel_state.get_tensor_model_parallel_group()
        size = parallel_state.get_tensor_model_parallel_world_size()
        ranks = tuple(torch.distributed.get_global_rank(group, i) for i in range(size))
        return cls(group, size, parallel_state.get_tensor_model_parallel_rank(), ranks,
                   torch.distributed.get_backend(group) == "gloo")

    def start_gather(self, local: torch.Tensor, into_buffer: bool = True
                     ) -> tuple[torch.Tensor, list[torch.Tensor], list]:
        """Start gathering every member's ``local`` (one shape on all) in rank order along dim
        0 of one new buffer ``[size * rows, ...]``: (buffer, the shards in rank order as
        views of it, handles to wait on). With ``into_buffer`` False the caller reads only the
        shards, so on gloo this rank's own slot is left unwritten and its shard is ``local``
        itself (one copy fewer).

        NCCL: one all-gather. gloo: one broadcast per member into its slot; on one host
        gloo's allgather is 1.5-2x slower than that for the same bytes (measured by
        ``benchmarks/weight_sync.py``: ``torch_all_gather`` against ``transport``)."""
        gathered = local.new_empty((self.size * local.shape[0], *local.shape[1:]))
        shards = list(gathered.chunk(self.size))
        if not self.gloo:
            return gathered, shards, [_all_gather_into(gathered, local, group=self.group,
                                                       async_op=True)]
        if into_buffer:
            shards[self.rank].copy_(local)
        else:
            shards[self.rank] = local
        return gathered, shards, [torch.distributed.broadcast(shard, src=src, group=self.group,
                                                              async_op=True)
                                  for shard, src in zip(shards, self.global_ranks)]


def high_precision(param: torch.Tensor) -> torch.Tensor:
    """``param`` detached, as a plain tensor of its nominal dtype: a Transformer Engine FP8
    parameter (megatron-core's ``is_float8tensor``: TE 2.x's ``QuantizedTensor``, whose nominal
    dtype is the params dtype it was built with) is dequantized through TE's
    ``dequantize(dtype=...)``; any other parameter is returned as a view."""
    from megatron.core.fp8_utils import is_float8tensor

    if is_float8tensor(param):
        return param.detach().dequantize(dtype=param.dtype)
    return param.detach()


@dataclass(frozen=True)
class ExportedParam:
    """One parameter of this rank and the Hugging Face tensors it becomes."""
    param: torch.Tensor                 # the parameter itself (this rank's TP shard)
    mapping: ParamMapping
    names: tuple[str, ...]              # HF names, global layer number filled in
    dims: ModelDims
    partition_dim: Optional[int]        # TP split dimension; None: not gathered

    @property
    def gathers_in_place(self) -> bool:
        """Whether the gathered buffer *is* the global tensor (a plain row split)."""
        return self.partition_dim == 0 and self.mapping.merge_tp is concatenate_shards

    def start(self, tp: TPGroup) -> "PendingParam":
        """Start the TP gather of this parameter (asynchronous; collective over the TP group
        when the parameter is split)."""
        local = high_precision(self.param)
        if self.partition_dim is None:
            return PendingParam(self, local, [], (), None)
        local = local.contiguous()
        gathered, shards, handles = tp.start_gather(local, into_buffer=self.gathers_in_place)
        return PendingParam(self, gathered, shards, tuple(handles), local)


@dataclass(frozen=True)
class PendingParam:
    """A parameter whose gather may still be running."""
    entry: ExportedParam
    buffer: torch.Tensor                # the gathered [tp * rows, ...] or the local tensor
    shards: list                        # the TP shards in rank order ([] when not gathered)
    handles: tuple                      # the gather's collectives, to wait on
    source: Optional[torch.Tensor]      # the gather's input, alive until they finish

    def global_tensor(self) -> torch.Tensor:
        """The parameter as one tensor of the whole model: the gathered buffer for a plain
        row split; one copy through ``merge_tp`` for other splits."""
        for handle in self.handles:
            handle.wait()
        entry = self.entry
        if entry.partition_dim is None or entry.gathers_in_place:
            return self.buffer
        return entry.mapping.merge_tp(self.shards, entry.partition_dim)

    def hf_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        entry = self.entry
        return zip(entry.names, entry.mapping.to_hf(entry.dims, self.global_tensor()))


class HFExport:
    """What weight sync needs to know about ``model_chunks``, read once from their sharded
    state dicts: per parameter of this rank, in order, its mapping, HF names and TP split.

    Tied output layers are left out (the embedding, on the first stage, carries them);
    ``_extra_state`` objects too. A parameter without a mapping in ``arch``'s family is a
    ConversionError. The plan holds the parameters themselves, so it reads their current values
    at every sync; :meth:`describes` tells whether the chunks still hold those parameters."""

    def __init__(self, model_chunks: list, arch: Architecture):
        from megatron.core import parallel_state
        from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensorFactory

        by_key = {m.megatron: m for m in mappings_for(arch)}
        split = parallel_state.get_tensor_model_parallel_world_size() > 1
        self.params = _parameters(model_chunks)
        self.entries: list[ExportedParam] = []
        for chunk in model_chunks:
            # The padded vocabulary of this model, whatever divisor it was built with.
            dims = ModelDims(arch, chunk.vocab_size)
            for sharded in chunk.sharded_state_dict().values():
                if isinstance(sharded, ShardedObject):
                    continue  # _extra_state
                if sharded.replica_id[0] != 0:
                    continue  # the last stage's copy of tied embeddings
                if sharded.key not in by_key:
                    raise ConversionError(f"parameter {sharded.key} of the model has no Hugging "
                                          f"Face mapping in family {arch.family}")
                mapping = by_key[sharded.key]
                first = (sharded.build()[0] if isinstance(sharded, ShardedTensorFactory)
                         else sharded)
                layer = first.global_offset[0] if first.prepend_axis_num else None
                gathered = split and getattr(sharded.data, "tensor_model_parallel", False)
                self.entries.append(ExportedParam(
                    sharded.data, mapping, mapping.hf_names(layer), dims,
                    sharded.data.partition_dim if gathered else None))

    def describes(self, model_chunks: list) -> bool:
        """Whether ``model_chunks`` hold exactly the parameters this plan was read from (a
        rebuilt or re-wrapped model needs a new plan; values changed in place do not)."""
        current = _parameters(model_chunks)
        return len(current) == len(self.params) and all(
            a is b for a, b in zip(current, self.params))

    def named_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(hf_name, full tensor)`` of every parameter of the plan, in order; detached, in
        the parameters' (nominal) dtype and device. Collective over the TP group."""
        tp = TPGroup.current()
        # One gather ahead: the next parameter travels while this one is merged, renamed and
        # bucketed (so at most two gathered parameters are alive besides the buckets).
        pending = None
        for entry in self.entries:
            started = entry.start(tp)
            if pending is not None:
                yield from pending.hf_tensors()
            pending = started
        if pending is not None:
            yield from pending.hf_tensors()


def _parameters(model_chunks: list) -> list[torch.Tensor]:
    return [p for chunk in model_chunks for p in chunk.parameters()]


def megatron_to_hf_named_tensors(model_chunks: list, arch: Architecture
                                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, full tensor)`` for the parameters of this rank's pipeline stage.

    Tied output layers are yielded once (as the embedding, on the first stage); vocabulary
    padding is removed. Tensors are detached, in the parameters' (nominal: FP8 weights are
    dequantized) dtype and device. Reads the
    sharded state dicts on every call: a caller that syncs repeatedly keeps an
    :class:`HFExport` instead."""
    yield from HFExport(model_chunks, arch).named_tensors()
