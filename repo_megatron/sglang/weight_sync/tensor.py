"""``tensor`` (colocated): ``/update_weights_from_tensor`` with flattened buckets, one
serialised payload per engine TP rank (slime's ``update_weight_from_tensor.py``). On GPUs the
payload holds CUDA IPC handles, so trainer and server must share the node."""

from __future__ import annotations

from .base import Bucket, SyncTarget, WeightSyncStrategy
from .buckets import split_by_dtype
from .flattened_bucket import flatten, serialize


class TensorStrategy(WeightSyncStrategy):
    name = "tensor"

    async def push(self, target: SyncTarget, bucket: Bucket) -> None:
        import asyncio

        for group in split_by_dtype(bucket):
            payload = serialize(flatten(group))
            # every TP rank of an engine reads its own entry; this process holds one copy
            await asyncio.gather(*(
                target.client.request(worker, "/update_weights_from_tensor", {
                    "serialized_named_tensors": [payload] * target.tp_sizes.get(worker, 1),
                    "load_format": "flattened_bucket", "flush_cache": False})
                for worker in target.workers))
