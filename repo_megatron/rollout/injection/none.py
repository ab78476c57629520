"""``injection: none``: plain GRPO, the groups stay as sampled."""

from __future__ import annotations

from . import register_injection
from .base import Injection


@register_injection("none")
class NoInjection(Injection):
    def __init__(self, algorithm, formatter):
        pass

    def inject(self, groups, sampled, tools):
        return groups, {}
