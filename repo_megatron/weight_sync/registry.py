"""The weight sync strategies by name (``rollout.sglang.weight_sync``): one file each, one
line here.

A strategy is a :class:`~.base.WeightSyncStrategy` subclass built as ``cls(cfg, stage)`` by
each pipeline stage's sender. This module imports none of them (the config reads the names).
"""

from __future__ import annotations

from ..registry import Registry

STRATEGIES = Registry("weight sync strategy", "rollout.sglang.weight_sync", {
    "disk": "repo_megatron.weight_sync.disk:DiskStrategy",
    "tensor": "repo_megatron.weight_sync.tensor:TensorStrategy",
    "distributed": "repo_megatron.weight_sync.distributed:DistributedStrategy",
})
