"""Weight sync to the embedded engine: Megatron shards -> full Hugging Face tensors on rank 0.

Each pipeline stage's TP group gathers its shards and maps them to HF names
(:func:`repo_megatron.convert.megatron_to_hf_named_tensors`, the converters' mapping); the
stages' leaders (DP rank 0, TP rank 0) then send them to global rank 0, which loads them into
the engine. SGLang servers are updated by the strategies in :mod:`repo_megatron.sglang`.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..convert import megatron_to_hf_named_tensors
from ..models.architecture import Architecture


def gather_hf_weights(model_chunks: list, arch: Architecture) -> Optional[dict[str, torch.Tensor]]:
    """Every parameter as a full HF-named CPU tensor on global rank 0 (None elsewhere).
    Collective: every rank of DP rank 0 must call it; other DP ranks return at once."""
    from megatron.core import parallel_state as ps

    if ps.get_data_parallel_rank() != 0:
        return None
    local = {name: t.detach().to("cpu", copy=True)
             for name, t in megatron_to_hf_named_tensors(model_chunks, arch)}
    if ps.get_tensor_model_parallel_rank() != 0:
        return None
    if ps.get_pipeline_model_parallel_world_size() > 1:
        group = ps.get_pipeline_model_parallel_group()
        first = torch.distributed.get_global_rank(group, 0)
        stages = [None] * ps.get_pipeline_model_parallel_world_size() \
            if torch.distributed.get_rank() == first else None
        torch.distributed.gather_object(local, stages, dst=first, group=group)
        if stages is None:
            return None
        local = {k: v for stage in stages for k, v in stage.items()}
    return local if torch.distributed.get_rank() == 0 else None
