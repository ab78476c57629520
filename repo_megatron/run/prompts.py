"""The order prompts are trained in: seeded shuffles per epoch, weighted mixtures of sources,
resumable from a position."""

from __future__ import annotations

import logging
import random
from bisect import bisect_right
from itertools import accumulate
from typing import Sequence

from ..rollout.seeds import request_seed
from ..rollout.types import Prompt

log = logging.getLogger(__name__)


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


class MixtureSampler:
    """Prompts from several sources, each drawn from a source chosen by weight.

    Draw ``k`` of the run picks its source with a random number seeded by (seed, k), and each
    source hands out its own prompts in seeded epochs (:class:`PromptSampler`). The state --
    the number of draws and every source's (epoch, index) -- is all a resumed run needs to
    continue with exactly the prompts the uninterrupted run would have seen. One source is the
    ``data.path`` run: the same order as before mixtures existed.

    ``sources``: ``{name: (prompts, weight)}`` in config order.
    """

    def __init__(self, sources: dict[str, tuple[Sequence[Prompt], float]], seed: int,
                 shuffle: bool = True):
        if not sources:
            raise ValueError("no prompt sources")
        self.seed = seed
        self.names = list(sources)
        single = len(sources) == 1
        self.samplers = {name: PromptSampler(prompts, seed if single else
                                             request_seed(seed, "data", name), shuffle)
                         for name, (prompts, _) in sources.items()}
        total = sum(weight for _, weight in sources.values())
        self.cumulative = list(accumulate(weight / total for _, weight in sources.values()))
        self.draws = 0

    def source_of(self, draw: int) -> str:
        """The source of draw number ``draw`` (a pure function of the seed and ``draw``)."""
        if len(self.names) == 1:
            return self.names[0]
        u = random.Random(request_seed(self.seed, "mixture", draw)).random()
        return self.names[min(bisect_right(self.cumulative, u), len(self.names) - 1)]

    def take(self, n: int) -> list[Prompt]:
        out = []
        for _ in range(n):
            out += self.samplers[self.source_of(self.draws)].take(1)
            self.draws += 1
        return out

    def state(self) -> dict:
        return {"draws": self.draws,
                "sources": {name: s.state() for name, s in self.samplers.items()}}

    def load_state(self, state: dict) -> None:
        """Restore a :meth:`state`; a source the checkpoint does not know starts at its
        beginning (with a warning), and positions of sources no longer configured are dropped."""
        if "sources" not in state:                  # a checkpoint of a one-file run
            state = {"draws": 0, "sources": {self.names[0]: state}} if len(self.names) == 1 \
                else {"draws": 0, "sources": {}}
        self.draws = int(state["draws"])
        saved = state["sources"]
        for name, sampler in self.samplers.items():
            if name in saved:
                sampler.load_state(saved[name])
            else:
                log.warning("data source %s is not in the checkpoint: it starts from its first "
                            "prompt", name)
        dropped = sorted(set(saved) - set(self.samplers))
        if dropped:
            log.warning("the checkpoint has data sources that are not configured any more: %s",
                        ", ".join(dropped))
