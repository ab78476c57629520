"""``disk``: write the tensors as Hugging Face safetensors shards in a directory every worker
can read, then ``/update_weights_from_disk`` loads them (slime's
``update_weight_from_disk.py``). Works across nodes given a shared filesystem; the slowest
strategy, and the one that needs nothing but HTTP."""

from __future__ import annotations

import json
import os
import tempfile

from safetensors.torch import save_file

from .base import Bucket, SyncTarget, WeightSyncStrategy


class DiskStrategy(WeightSyncStrategy):
    """Shards ``model-XXXXX.safetensors`` plus ``model.safetensors.index.json`` in
    ``cfg.disk_dir`` (a fresh temporary directory when empty, single-node only)."""
    name = "disk"
    in_session = False

    def __init__(self, cfg):
        super().__init__(cfg)
        self.directory = cfg.disk_dir or tempfile.mkdtemp(prefix="repo_megatron_weights_")
        self.weight_map: dict[str, str] = {}

    async def prepare(self, target: SyncTarget) -> None:
        os.makedirs(self.directory, exist_ok=True)
        for name in os.listdir(self.directory):   # shards of the previous update
            if name.startswith("model-") and name.endswith(".safetensors"):
                os.remove(os.path.join(self.directory, name))
        self.weight_map = {}

    async def push(self, target: SyncTarget, bucket: Bucket) -> None:
        shard = f"model-{len(set(self.weight_map.values())) + 1:05d}.safetensors"
        # safetensors wants contiguous CPU tensors without shared storage (tied weights)
        save_file({name: t.detach().to("cpu").contiguous().clone() for name, t in bucket},
                  os.path.join(self.directory, shard), metadata={"format": "pt"})
        self.weight_map.update({name: shard for name, _ in bucket})

    async def finish(self, target: SyncTarget) -> None:
        with open(os.path.join(self.directory, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": self.weight_map}, f)
        await target.post_all("/update_weights_from_disk", {"model_path": self.directory})
