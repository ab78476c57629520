"""The replay retrievals by name (``algorithm.replay.strategy``): one file each, one line here.

A retrieval is ``fn(entries oldest first, k <= len(entries), rng: random.Random)`` returning
the ``k`` entries to replay. This module imports none of them (the config reads the names).
"""

from __future__ import annotations

import random
from typing import Callable, Sequence

from ...registry import Registry

Retrieval = Callable[[Sequence, int, random.Random], list]

RETRIEVALS: Registry[Retrieval] = Registry("replay retrieval", "algorithm.replay.strategy", {
    "recency": "repo_megatron.rollout.replay.recency:most_recent",
    "reward": "repo_megatron.rollout.replay.highest_reward:highest_reward",
    "variance": "repo_megatron.rollout.replay.max_variance:max_variance",
    "random": "repo_megatron.rollout.replay.uniform:uniform",
})
