"""This rank's Megatron parameters as full Hugging Face tensors, for weight sync.

:func:`megatron_to_hf_named_tensors` walks the model chunks' sharded state dicts, which give
each parameter its checkpoint key and, for layer keys, its *global* layer number (Megatron
adds the PP / virtual-PP layer offset there), gathers TP shards over the tensor-parallel group
(``linear_fc1`` through :func:`~repo_megatron.models.weight_mapping.merge_tp_gate_up`) and
maps the result to HF names with the same family mapping the converters use. Collective over
the TP group: every TP rank of a pipeline stage must iterate it, and each gets the same
tensors; which rank sends them to the rollout engine is the sync strategy's choice.
"""

from __future__ import annotations

from typing import Iterator

import torch

from ..config.base import ConfigError
from ..models.architecture import Architecture
from ..models.weight_mapping import ModelDims, mappings_for


def _gather_tp(local: torch.Tensor, dim: int, merge) -> torch.Tensor:
    from megatron.core import parallel_state

    group = parallel_state.get_tensor_model_parallel_group()
    size = parallel_state.get_tensor_model_parallel_world_size()
    shards = [torch.empty_like(local) for _ in range(size)]
    torch.distributed.all_gather(shards, local.contiguous(), group=group)
    return merge(shards, dim)


def megatron_to_hf_named_tensors(model_chunks: list, arch: Architecture
                                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, full tensor)`` for the parameters of this rank's pipeline stage.

    Tied output layers are yielded once (as the embedding, on the first stage); vocabulary
    padding is removed. Tensors are detached, in the parameters' dtype and device."""
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensorFactory

    by_key = {m.megatron: m for m in mappings_for(arch)}
    tp = parallel_state.get_tensor_model_parallel_world_size()
    for chunk in model_chunks:
        # The padded vocabulary of this model, whatever divisor it was built with.
        dims = ModelDims(arch, chunk.vocab_size)
        for sharded in chunk.sharded_state_dict().values():
            if isinstance(sharded, ShardedObject):
                continue  # _extra_state
            if sharded.replica_id[0] != 0:
                continue  # the last stage's copy of tied embeddings
            if sharded.key not in by_key:
                raise ConfigError(f"parameter {sharded.key} of the model has no Hugging Face "
                                  f"mapping in family {arch.family}")
            mapping = by_key[sharded.key]
            first = sharded.build()[0] if isinstance(sharded, ShardedTensorFactory) else sharded
            layer = first.global_offset[0] if first.prepend_axis_num else None
            local = sharded.data.detach()
            if tp > 1 and getattr(sharded.data, "tensor_model_parallel", False):
                local = _gather_tp(local, sharded.data.partition_dim, mapping.merge_tp)
            yield from zip(mapping.hf_names(layer), mapping.to_hf(dims, local))

