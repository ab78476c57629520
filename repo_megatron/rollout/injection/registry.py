"""The injection strategies by name (``algorithm.injection``): one file each, one line here.

A strategy is a class taking ``(algorithm config, chat formatter)`` and implementing
:class:`~.base.Injection`. This module imports none of them (the config reads the names).
"""

from __future__ import annotations

from ...registry import Registry

INJECTIONS = Registry("injection strategy", "algorithm.injection", {
    "repo": "repo_megatron.rollout.injection.repo:RePOInjection",
    "none": "repo_megatron.rollout.injection.none:NoInjection",
    "luffy": "repo_megatron.rollout.injection.luffy:LuffyInjection",
})
