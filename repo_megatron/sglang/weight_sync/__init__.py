"""Weight sync strategies, one per file, registered in :mod:`.registry` by the name
``sglang.weight_sync`` uses. Importing this package loads none of its submodules."""

from __future__ import annotations

from ...lazy_exports import lazy_getattr

_EXPORTS = {"STRATEGIES": ".registry", "SyncPlan": ".base", "SyncTarget": ".base",
            "WeightSyncStrategy": ".base"}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
