"""What an injection strategy is: requests it wants sampled, and how it changes the groups."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Protocol, Sequence

from ...engines.base import GenerationResult
from ...rewards.base import RewardResult
from ..types import Group, Prompt


@dataclass(frozen=True)
class Request:
    """One response to sample: for ``prompt``, of ``kind`` (``rollout``, ``rephrase``) number
    ``index``, from ``prompt_ids`` (q itself, or P(q, k) for a rephrase)."""
    prompt: Prompt
    kind: str
    index: int
    prompt_ids: tuple[int, ...]


class StageTools(Protocol):
    """What the stage lends a strategy: seeded sampling and scoring."""

    def generate(self, requests: Sequence[Request]) -> list[GenerationResult]: ...

    def score(self, prompts: Sequence[Prompt], texts: Sequence[str]) -> list[RewardResult]: ...


class Injection(abc.ABC):
    """A way of bringing off-policy knowledge (the row's solution) into the groups."""

    def prefetch(self, prompts: Sequence[Prompt]) -> list[Request]:
        """Requests to sample together with the rollouts (eager schedules)."""
        return []

    def follow_up(self, group: Group) -> list[Request]:
        """Requests to send as soon as ``group`` is scored and gated, while other groups
        may still be decoding (overlapped schedules)."""
        return []

    def state(self) -> dict:
        """Plain data a resumed run needs to schedule as the uninterrupted one would."""
        return {}

    def load_state(self, state: dict) -> None:
        """Restore a :meth:`state`."""

    @abc.abstractmethod
    def inject(self, groups: list[Group], sampled: Sequence[tuple[Request, GenerationResult]],
               tools: StageTools) -> tuple[list[Group], dict[str, float]]:
        """The groups after injection (gates already set by the stage) and counters for the
        step metrics. ``sampled`` pairs each :meth:`prefetch` and :meth:`follow_up` request
        with its result, in prompt order."""
