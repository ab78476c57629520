"""``injection: none``: plain GRPO, the groups stay as sampled."""

from __future__ import annotations

from .base import Injection


class NoInjection(Injection):
    def __init__(self, algorithm, formatter):
        pass

    def inject(self, groups, sampled, tools):
        return groups, {}
