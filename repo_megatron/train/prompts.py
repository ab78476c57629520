"""The order prompts are trained in: seeded shuffles per epoch, resumable from a position."""

from __future__ import annotations

import random
from typing import Sequence

from ..rollout.types import Prompt


class PromptSampler:
    """Hands out prompts ``n`` at a time, epoch after epoch, each epoch in a seeded order.

    ``state()`` / ``load_state()`` capture the position (epoch, index), so a resumed run sees
    exactly the prompts the uninterrupted run would have seen."""

    def __init__(self, prompts: Sequence[Prompt], seed: int, shuffle: bool = True):
        if not prompts:
            raise ValueError("no prompts to sample from")
        self.prompts, self.seed, self.shuffle = list(prompts), seed, shuffle
        self.epoch, self.index = 0, 0
        self._order = self._order_of(0)

    def _order_of(self, epoch: int) -> list[int]:
        order = list(range(len(self.prompts)))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def take(self, n: int) -> list[Prompt]:
        out = []
        while len(out) < n:
            if self.index == len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._order_of(self.epoch)
            out.append(self.prompts[self._order[self.index]])
            self.index += 1
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._order_of(self.epoch)
