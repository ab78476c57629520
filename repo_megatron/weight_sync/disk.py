"""``disk``: every pipeline stage writes its own buckets as Hugging Face safetensors shards in
a directory every worker can read; the engine's rank then writes the index (atomically) and
``/update_weights_from_disk`` loads it (slime's ``update_weight_from_disk.py``). Works across
nodes given a shared filesystem; the slowest strategy, and the one that needs nothing but HTTP.

Each update gets a fresh directory ``<disk_dir>/weights_v<version>`` (no shard of an earlier
update can leak in); the previous one is removed once the workers have loaded the new one.
"""

from __future__ import annotations

import json
import os
import shutil

from safetensors.torch import save_file

from ..engines.sglang.protocol import disk_update_body
from .base import SyncTarget, WeightSyncStrategy
from .buckets import Bucket

INDEX = "model.safetensors.index.json"


def version_dir(disk_dir: str, version: int) -> str:
    return os.path.join(disk_dir, f"weights_v{version:06d}")


def write_index(directory: str, weight_map: dict[str, str]) -> None:
    """``model.safetensors.index.json`` written aside and renamed into place."""
    tmp = os.path.join(directory, INDEX + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(directory, INDEX))


def own_storage(bucket: Bucket) -> dict:
    """The bucket as safetensors wants it: contiguous CPU tensors, none sharing storage with
    another (tied weights, views of one gathered tensor); copies only where needed."""
    out, seen = {}, set()
    for name, tensor in bucket:
        tensor = tensor.detach().to("cpu").contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in seen:
            tensor = tensor.clone()
        seen.add(tensor.untyped_storage().data_ptr())
        out[name] = tensor
    return out


class DiskStrategy(WeightSyncStrategy):
    """Shards ``model-pp<stage>-<n>.safetensors`` of every stage plus the index."""
    name = "disk"
    in_session = False
    concurrent_stages = True
    uses_disk_dir = True

    def __init__(self, cfg, stage: int = 0):
        super().__init__(cfg, stage)
        self.weight_map: dict[str, str] = {}

    async def prepare(self, target: SyncTarget) -> None:
        os.makedirs(version_dir(target.plan.disk_dir, target.plan.version), exist_ok=True)
        self.weight_map = {}

    async def push(self, target: SyncTarget, bucket: Bucket) -> None:
        shard = f"model-pp{self.stage:02d}-{len(set(self.weight_map.values())) + 1:05d}.safetensors"
        save_file(own_storage(bucket),
                  os.path.join(version_dir(target.plan.disk_dir, target.plan.version), shard),
                  metadata={"format": "pt"})
        self.weight_map.update({name: shard for name, _ in bucket})

    def stage_result(self) -> dict[str, str]:
        return self.weight_map

    async def finish(self, target: SyncTarget, stage_results: list) -> None:
        directory = version_dir(target.plan.disk_dir, target.plan.version)
        weight_map = {name: shard for stage in stage_results for name, shard in stage.items()}
        write_index(directory, weight_map)
        await target.post_all("/update_weights_from_disk", disk_update_body(directory))
        for name in os.listdir(target.plan.disk_dir):          # earlier updates' directories
            path = os.path.join(target.plan.disk_dir, name)
            if name.startswith("weights_v") and path != directory:
                shutil.rmtree(path, ignore_errors=True)
