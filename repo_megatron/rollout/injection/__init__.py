"""Injection strategies by name (``algorithm.injection``): one file each, registered in
:mod:`.registry`. Importing this package loads none of its submodules."""

from __future__ import annotations

from ...lazy_exports import lazy_getattr

_EXPORTS = {"INJECTIONS": ".registry", "Injection": ".base", "Request": ".base",
            "StageTools": ".base"}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
