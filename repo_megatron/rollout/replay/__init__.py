"""Replay-Enhanced Policy Optimization: a per-prompt buffer of past rollouts and the retrieval
strategies (``algorithm.replay.strategy``), one file each."""

from __future__ import annotations

import random
from typing import Callable, Sequence

from ..types import Sample

# strategy(entries oldest first, k <= len(entries), rng) -> the k entries to replay
Retrieval = Callable[[Sequence[Sample], int, random.Random], list[Sample]]

RETRIEVALS: dict[str, Retrieval] = {}


def register_retrieval(name: str) -> Callable[[Retrieval], Retrieval]:
    """Decorator: make a retrieval selectable as ``algorithm.replay.strategy: <name>``."""
    def wrap(fn: Retrieval) -> Retrieval:
        RETRIEVALS[name] = fn
        return fn
    return wrap


def get_retrieval(name: str) -> Retrieval:
    from . import highest_reward, max_variance, recency, uniform  # noqa: F401  (register)

    return RETRIEVALS[name]


from .buffer import ReplayBuffer  # noqa: E402  (needs the registry above)

__all__ = ["RETRIEVALS", "ReplayBuffer", "get_retrieval", "register_retrieval"]
