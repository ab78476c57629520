"""Named variants of one kind (policy losses, injection strategies, rewards, model families...),
read by the name a config or a file gives.

A leaf: it imports only :mod:`repo_megatron.errors`. Each kind has its own :class:`Registry`
object in a small module below the variants it names (``algorithm/registry.py``,
``rollout/injection/registry.py``...): that module imports none of them, and they (or the code
that picks one) may import it, so a registry is in no import cycle.

Two ways in, one lookup:

- the built-in variants are *declared* where the registry is made, one line each,
  ``"name": "package.module:attribute"``, and imported on first use. The config reads their
  names (choices, the config reference) without importing them, which keeps loading a config
  free of torch and Megatron;
- any other code registers with the decorator ``@REGISTRY.register("name")``; its module must
  be imported before the name is looked up.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any, Callable, Generic, Iterator, TypeVar

from .errors import ConfigError

T = TypeVar("T")


def import_object(path: str) -> Any:
    """The object at ``"package.module:attribute"`` (ImportError / AttributeError if none)."""
    module_name, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module_name), attribute)


class _Declared:
    """A built-in entry not imported yet: where it lives."""

    def __init__(self, path: str):
        self.path = path


def _where(entry: Any) -> str:
    """Where an entry comes from, for messages: its import path, or its repr."""
    if isinstance(entry, _Declared):
        return entry.path
    if hasattr(entry, "__qualname__"):
        return f"{entry.__module__}.{entry.__qualname__}"
    return repr(entry)


class Registry(Mapping, Generic[T]):
    """Variants of one kind by name. ``get`` fails with the config key and the known names;
    ``registry[name]`` is the plain mapping lookup (KeyError)."""

    def __init__(self, kind: str, config_key: str, builtins: Mapping[str, str] = {}):
        self.kind = kind              # "policy loss", for messages
        self.config_key = config_key  # "algorithm.policy_loss", for messages
        self.builtins = dict(builtins)  # name -> "package.module:attribute", as declared
        self._entries: dict[str, Any] = {name: _Declared(path) for name, path in builtins.items()}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register the object under ``name`` (a name can be taken only once)."""
        def decorator(obj: T) -> T:
            taken = self._entries.get(name, obj)
            if taken != obj:
                raise ValueError(f"{self.kind} {name!r} is already registered by {_where(taken)}")
            self._entries[name] = obj
            return obj
        return decorator

    def check(self, name: str, key: str = "") -> None:
        """ConfigError naming ``key`` (default: the registry's config key) and the registered
        names unless ``name`` is registered."""
        if name not in self._entries:
            shown = name if name else "''"  # as the config would write it
            raise ConfigError(f"{key or self.config_key}={shown} is not a registered "
                              f"{self.kind} (registered: {', '.join(self)})")

    def get(self, name: str) -> T:  # type: ignore[override]
        """The variant registered as ``name`` (imported on first use); ConfigError if none."""
        self.check(name)
        return self[name]

    def __getitem__(self, name: str) -> T:
        entry = self._entries[name]
        if isinstance(entry, _Declared):
            entry = self._entries[name] = import_object(entry.path)
        return entry

    def __contains__(self, name: object) -> bool:  # without importing a declared variant
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)
