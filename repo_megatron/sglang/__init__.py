"""SGLang rollouts: an async HTTP client, sglang-router support, weight sync strategies, and
a launcher for server pools. :class:`SGLangEngine` is the rollout engine the stage uses.

Importing this package loads none of its submodules (the config reads the weight sync
registry without torch): each name below is imported on first use.
"""

from __future__ import annotations

from ..lazy_exports import lazy_getattr

_EXPORTS = {"SGLangClient": ".client", "SGLangError": ".client", "SGLangTimeout": ".client",
            "SGLangEngine": ".engine"}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
