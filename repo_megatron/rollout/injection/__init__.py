"""Injection strategies by name (``algorithm.injection``): one file each."""

from __future__ import annotations

from typing import Callable

from .base import Injection, Request, StageTools

INJECTIONS: dict[str, type[Injection]] = {}


def register_injection(name: str) -> Callable[[type[Injection]], type[Injection]]:
    """Class decorator: make a strategy selectable as ``algorithm.injection: <name>``."""
    def wrap(cls: type[Injection]) -> type[Injection]:
        INJECTIONS[name] = cls
        return cls
    return wrap


def build_injection(algorithm, formatter) -> Injection:
    """The strategy ``algorithm.injection`` names, built from the algorithm config."""
    from . import luffy, none, repo  # noqa: F401  (register the strategies)

    return INJECTIONS[algorithm.injection](algorithm, formatter)


__all__ = ["INJECTIONS", "Injection", "Request", "StageTools", "build_injection",
           "register_injection"]
