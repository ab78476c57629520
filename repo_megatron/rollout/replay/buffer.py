"""The replay buffer: per prompt, a FIFO of past on-policy rollouts with their behaviour
log-probs (the policy that sampled them, under the original prompt)."""

from __future__ import annotations

import random
from collections import deque
from dataclasses import asdict, replace
from typing import Sequence

from ..types import Sample
from .registry import RETRIEVALS


class ReplayBuffer:
    """``capacity`` samples per prompt uid; retrieval by a registered strategy."""

    def __init__(self, capacity: int, strategy: str, min_size: int):
        self.capacity = capacity
        self.retrieval = RETRIEVALS.get(strategy)
        self.min_size = min_size
        self._entries: dict[str, deque[Sample]] = {}

    def __len__(self) -> int:
        return sum(len(d) for d in self._entries.values())

    def add(self, samples: Sequence[Sample]) -> None:
        """Store samples that have valid behaviour log-probs (others cannot be replayed)."""
        for sample in samples:
            if sample.logprobs_valid and not sample.is_offpolicy:
                self._entries.setdefault(sample.prompt_uid, deque(maxlen=self.capacity)).append(sample)

    def retrieve(self, uid: str, k: int, rng: random.Random) -> list[Sample]:
        """Up to ``k`` past samples of prompt ``uid`` marked as replayed; none until the
        prompt has ``min_size`` of them."""
        entries = self._entries.get(uid, ())
        if len(entries) < self.min_size:
            return []
        chosen = self.retrieval(list(entries), min(k, len(entries)), rng)
        return [replace(s, is_replay=True, is_offpolicy=True) for s in chosen]

    def state(self) -> dict:
        """The stored samples as plain data (checkpoints load it with ``weights_only``)."""
        return {uid: [asdict(s) for s in entries] for uid, entries in self._entries.items()}

    def load_state(self, state: dict) -> None:
        self._entries = {uid: deque((Sample.from_plain(s) for s in samples),
                                    maxlen=self.capacity)
                         for uid, samples in state.items()}
