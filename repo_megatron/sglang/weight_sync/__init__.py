"""Weight sync strategies, one per file, registered by the name ``sglang.weight_sync`` uses."""

from .base import SyncPlan, SyncTarget, WeightSyncStrategy
from .disk import DiskStrategy
from .distributed import DistributedStrategy
from .tensor import TensorStrategy

STRATEGIES: dict[str, type[WeightSyncStrategy]] = {
    "disk": DiskStrategy,
    "tensor": TensorStrategy,
    "distributed": DistributedStrategy,
}


def build_strategy(cfg, stage: int = 0) -> WeightSyncStrategy:
    """The strategy named by ``cfg.weight_sync``, for the sender of pipeline stage ``stage``."""
    return STRATEGIES[cfg.weight_sync](cfg, stage)


__all__ = ["STRATEGIES", "SyncPlan", "SyncTarget", "WeightSyncStrategy", "build_strategy"]
