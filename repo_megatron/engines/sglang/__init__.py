"""SGLang rollouts: an async HTTP client, sglang-router support, and a launcher for server
pools. :class:`SGLangEngine` is the rollout engine the stage uses; the weights reach its
servers through :mod:`repo_megatron.weight_sync`'s strategies.

Importing this package loads none of its submodules: each name below is imported on first use.
"""

from __future__ import annotations

from ...lazy_exports import lazy_getattr

_EXPORTS = {"SGLangClient": ".client", "SGLangError": ".client", "SGLangTimeout": ".client",
            "SGLangEngine": ".engine"}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
