"""A process group between the trainer and SGLang's workers, beside any default group.

It follows SGLang's ``init_custom_process_group`` (``python/sglang/srt/utils``), which the
servers run on ``/init_weights_update_group``: TCP rendezvous at ``master_address:port``, a
store prefixed with the group name, and torch's process-group helper, so both sides agree on
the store keys. torch has no public API for a second world, hence the private helper (as in
SGLang, slime and OpenRLHF).
"""

from __future__ import annotations

import inspect
from datetime import timedelta

import torch
import torch.distributed as dist


def init_weight_update_group(backend: str, master_address: str, master_port: int,
                             world_size: int, rank: int, group_name: str,
                             timeout: timedelta = timedelta(minutes=10)):
    """Join (rank 0: host) the group ``group_name``; returns the process group."""
    from torch.distributed.distributed_c10d import (Backend, PrefixStore,
                                                    _new_process_group_helper, _world,
                                                    rendezvous)

    store, rank, world_size = next(rendezvous(f"tcp://{master_address}:{master_port}", rank,
                                              world_size, timeout=timeout))
    store.set_timeout(timeout)
    store = PrefixStore(group_name, store)
    options = ("backend_options" if "backend_options" in
               inspect.signature(_new_process_group_helper).parameters else "pg_options")
    group, _ = _new_process_group_helper(world_size, rank, [], Backend(backend), store,
                                         group_name=group_name, timeout=timeout,
                                         **{options: None})
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


def broadcast_tensors(group, tensors: list[torch.Tensor], src: int = 0) -> None:
    """Broadcast ``tensors`` in order from ``src`` (in place on receivers)."""
    for tensor in tensors:
        dist.broadcast(tensor, src=src, group=group)


def destroy(group) -> None:
    dist.destroy_process_group(group)
