"""``distributed`` (disaggregated): every pipeline stage's sender owns one process group with
every worker's TP ranks (``/init_weights_update_group``, group ``repo_megatron_pp<stage>``,
the sender is rank 0), created at its first update and destroyed at shutdown or when the
workers change (``/destroy_weights_update_group``). Per bucket it announces names, dtypes and
shapes (``/update_weights_from_distributed``) while broadcasting the tensors (slime's
``update_weight_from_distributed.py``). Backend ``nccl`` on GPUs; ``gloo`` lets the same code
run against the CPU server."""

from __future__ import annotations

import asyncio
import logging
import socket

import torch

from ..engines.sglang.protocol import destroy_group_body, distributed_update_body, init_group_body
from ..runtime import cpu_compat
from ..runtime.ports import free_port
from .base import SyncTarget, WeightSyncStrategy
from .buckets import Bucket
from .process_group import broadcast_tensors, destroy, init_weight_update_group

log = logging.getLogger(__name__)

_CPU = torch.device("cpu")


def group_name(stage: int) -> str:
    return f"repo_megatron_pp{stage}"


def rank_offsets(workers: list[str], tp_size) -> tuple[list[int], int]:
    """(first group rank of each worker, world size): the sender is rank 0, worker i's TP
    ranks follow in order."""
    offsets, offset = [], 1
    for worker in workers:
        offsets.append(offset)
        offset += tp_size(worker)
    return offsets, offset


class DistributedStrategy(WeightSyncStrategy):
    name = "distributed"

    def __init__(self, cfg, stage: int = 0):
        super().__init__(cfg, stage)
        self.group = None
        self.members: list[str] = []
        # This rank's GPU, read here on its main thread (after distributed.initialize bound it):
        # prepare and push run on the sender's event-loop thread and the NCCL calls on worker
        # threads, where torch's current device is GPU 0 whatever the rank's is.
        self.device = cpu_compat.device() if cfg.distributed_backend == "nccl" else _CPU

    def _on_device(self, fn, *args):
        """``fn(*args)`` in a worker thread whose current GPU is this rank's."""
        def call():
            with cpu_compat.device_scope(self.device):
                return fn(*args)
        return asyncio.to_thread(call)

    async def prepare(self, target: SyncTarget) -> None:
        if self.group is not None and self.members == target.workers:
            return
        if self.group is not None:                      # the workers changed: reconnect
            await self.close(target)
        address = self.cfg.distributed_master_address or socket.gethostname()
        # several stages may share a host: each sender picks its own port
        port = (self.cfg.distributed_master_port + self.stage if self.cfg.distributed_master_port
                else free_port(host=""))  # the workers connect from their own hosts
        offsets, world_size = rank_offsets(target.workers, target.tp_size)
        name = group_name(self.stage)
        joins = [target.client.request(worker, "/init_weights_update_group", init_group_body(
            address, port, rank_offset, world_size, name, self.cfg.distributed_backend),
            retries=0) for worker, rank_offset in zip(target.workers, offsets)]
        host = self._on_device(init_weight_update_group, self.cfg.distributed_backend, address,
                               port, world_size, 0, name)
        self.group, *_ = await asyncio.gather(host, *joins)
        self.members = list(target.workers)

    async def push(self, target: SyncTarget, bucket: Bucket) -> None:
        tensors = [tensor.detach().to(self.device).contiguous() for _, tensor in bucket]
        body = distributed_update_body([name for name, _ in bucket], [t.dtype for t in tensors],
                                       [t.shape for t in tensors], group_name(self.stage))
        # the workers block in the broadcast until rank 0 sends, so announce first
        announced = [asyncio.ensure_future(target.client.request(
            worker, "/update_weights_from_distributed", body, retries=0))
            for worker in target.workers]
        await self._on_device(broadcast_tensors, self.group, tensors)
        await asyncio.gather(*announced)

    async def close(self, target: SyncTarget) -> None:
        """Destroy the group on the workers it joined and here."""
        if self.group is None:
            return
        name, members, group = group_name(self.stage), self.members, self.group
        self.group, self.members = None, []
        answers = await asyncio.gather(*(target.client.request(
            worker, "/destroy_weights_update_group", destroy_group_body(name), retries=0)
            for worker in members), return_exceptions=True)
        for worker, answer in zip(members, answers):
            if isinstance(answer, Exception):     # a dead worker has no group left to destroy
                log.warning("destroying %s on %s: %s", name, worker, answer)
        destroy(group)
