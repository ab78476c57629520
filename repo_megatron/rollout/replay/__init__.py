"""Replay-Enhanced Policy Optimization: a per-prompt buffer of past rollouts and the retrieval
strategies (``algorithm.replay.strategy``), one file each, registered in :mod:`.registry`.
Importing this package loads none of its submodules."""

from __future__ import annotations

from ...lazy_exports import lazy_getattr

_EXPORTS = {"RETRIEVALS": ".registry", "ReplayBuffer": ".buffer"}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
