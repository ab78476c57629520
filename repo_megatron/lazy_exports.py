"""Packages that import their public names on first use (PEP 562 ``__getattr__``), so that
importing the package loads none of its submodules."""

from __future__ import annotations

import importlib
from typing import Callable


def lazy_getattr(package: str, exports: dict[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` for ``package``: ``exports`` maps each public name to the
    relative module (``".chat"``) it is imported from when first used."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(exports[name], package), name)

    return __getattr__
