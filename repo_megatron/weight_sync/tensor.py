"""``tensor`` (colocated): ``/update_weights_from_tensor`` with flattened buckets (slime's
``update_weight_from_tensor.py``). ``serialized_named_tensors`` holds one entry per engine TP
rank and TP rank i reads entry i: on GPUs entry i must be made by the trainer process on the
GPU of that rank, so each such process serialises its own copy of the bucket (CUDA-IPC
handles, see :mod:`.flattened_bucket`) and the engine's first rank posts them together
(:mod:`repo_megatron.weight_sync.streamer`). One process alone (:meth:`TensorStrategy.push`) can
serve engines of TP 1, or any TP with CPU tensors, which travel by value."""

from __future__ import annotations

import asyncio

from ..engines.sglang.protocol import tensor_update_body
from .base import Bucket, SyncTarget, WeightSyncStrategy
from .flattened_bucket import bucket_payloads


class TensorStrategy(WeightSyncStrategy):
    name = "tensor"

    async def push(self, target: SyncTarget, bucket: Bucket) -> None:
        """Every worker gets this process's payloads, once per engine TP rank."""
        on_gpu = bool(bucket) and bucket[0][1].device.type != "cpu"
        wide = [w for w in target.workers if target.tp_size(w) > 1]
        if on_gpu and wide:
            raise RuntimeError(f"weight_sync=tensor: {wide[0]} runs TP "
                               f"{target.tp_size(wide[0])}; its TP rank i must read CUDA-IPC "
                               f"handles made on its own GPU, so one trainer process per "
                               f"engine GPU has to serialise (the Megatron session does)")
        for payload in bucket_payloads(bucket):
            await asyncio.gather(*(self.post(target, worker, [payload] * target.tp_size(worker))
                                   for worker in target.workers))

    async def post(self, target: SyncTarget, worker: str, entries: list[str]) -> None:
        """One flattened bucket to ``worker``: ``entries[i]`` for its TP rank i."""
        await target.client.request(worker, "/update_weights_from_tensor",
                                    tensor_update_body(entries))
