"""``distributed`` (disaggregated): the trainer joins a process group with every worker's TP
ranks (``/init_weights_update_group``, once), then per bucket announces names, dtypes and
shapes (``/update_weights_from_distributed``) while broadcasting the tensors from rank 0
(slime's ``update_weight_from_distributed.py``). Backend ``nccl`` on GPUs; ``gloo`` lets the
same code run against the CPU server."""

from __future__ import annotations

import asyncio
import socket

from ...runtime import cpu_compat
from .base import Bucket, SyncTarget, WeightSyncStrategy
from .process_group import broadcast_tensors, init_weight_update_group

GROUP_NAME = "repo_megatron_weight_update"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


class DistributedStrategy(WeightSyncStrategy):
    name = "distributed"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.group = None
        self.members: list[str] = []

    async def prepare(self, target: SyncTarget) -> None:
        if self.group is not None and self.members == target.workers:
            return
        address = self.cfg.distributed_master_address or socket.gethostname()
        port = self.cfg.distributed_master_port or free_port()
        world_size = 1 + sum(target.tp_sizes.get(w, 1) for w in target.workers)
        offsets, offset = [], 1                   # the trainer is rank 0
        for worker in target.workers:
            offsets.append(offset)
            offset += target.tp_sizes.get(worker, 1)
        joins = [target.client.request(worker, "/init_weights_update_group", {
            "master_address": address, "master_port": port, "rank_offset": rank_offset,
            "world_size": world_size, "group_name": GROUP_NAME,
            "backend": self.cfg.distributed_backend}, retries=0)
            for worker, rank_offset in zip(target.workers, offsets)]
        host = asyncio.to_thread(init_weight_update_group, self.cfg.distributed_backend,
                                 address, port, world_size, 0, GROUP_NAME)
        self.group, *_ = await asyncio.gather(host, *joins)
        self.members = list(target.workers)

    async def push(self, target: SyncTarget, bucket: Bucket) -> None:
        device = cpu_compat.device() if self.cfg.distributed_backend == "nccl" else "cpu"
        tensors = [tensor.detach().to(device).contiguous() for _, tensor in bucket]
        body = {"names": [name for name, _ in bucket],
                "dtypes": [str(t.dtype).removeprefix("torch.") for t in tensors],
                "shapes": [list(t.shape) for t in tensors],
                "group_name": GROUP_NAME, "flush_cache": False}
        # the workers block in the broadcast until rank 0 sends, so announce first
        announced = [asyncio.ensure_future(target.client.request(
            worker, "/update_weights_from_distributed", body, retries=0))
            for worker in target.workers]
        await asyncio.to_thread(broadcast_tensors, self.group, tensors)
        await asyncio.gather(*announced)
