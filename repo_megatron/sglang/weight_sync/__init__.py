"""Weight sync strategies, one per file, registered by the name ``sglang.weight_sync`` uses."""

from .base import SyncTarget, WeightSyncStrategy
from .disk import DiskStrategy
from .distributed import DistributedStrategy
from .tensor import TensorStrategy

STRATEGIES: dict[str, type[WeightSyncStrategy]] = {
    "disk": DiskStrategy,
    "tensor": TensorStrategy,
    "distributed": DistributedStrategy,
}


def build_strategy(cfg) -> WeightSyncStrategy:
    """The strategy named by ``cfg.weight_sync``."""
    return STRATEGIES[cfg.weight_sync](cfg)


__all__ = ["STRATEGIES", "SyncTarget", "WeightSyncStrategy", "build_strategy"]
