"""Reward functions: a registry by name, custom functions by import path, one result type.

A reward is ``fn(response: str, answer: str, question: str)`` returning a float (or bool), a
``(value, reason)`` pair or a :class:`RewardResult`. Built-ins register with
:func:`register_reward`; ``module:function`` names any importable function.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ..config.base import ConfigError

RewardFn = Callable[[str, str, str], Any]

REWARDS: dict[str, RewardFn] = {}


@dataclass(frozen=True)
class RewardRequest:
    """What a reward sees of one sample: the response, the prompt's reference answer and
    question, its expert solution (LLM judges may read it) and the source it came from (which
    picks the reward in a mixture)."""
    response: str
    answer: str
    question: str = ""
    solution: Optional[str] = None
    source: str = ""

    @classmethod
    def for_prompt(cls, prompt, response: str) -> "RewardRequest":
        """``response`` to ``prompt`` (a :class:`~repo_megatron.rollout.types.Prompt`)."""
        return cls(response, prompt.answer, prompt.question, prompt.solution, prompt.source)


@dataclass(frozen=True)
class RewardResult:
    """A reward value, why, and whether the reward itself failed (raised, hung, died)."""
    value: float
    reason: str
    failed: bool = False


def register_reward(name: str):
    """Decorator: make ``fn`` available as ``data.reward: <name>``."""
    def wrap(fn: RewardFn) -> RewardFn:
        REWARDS[name] = fn
        return fn
    return wrap


def resolve_reward(name: str) -> RewardFn:
    """The reward registered as ``name`` or the function at import path ``module:function``."""
    from . import exact, math_answer  # noqa: F401  (register the built-ins)

    if name in REWARDS:
        return REWARDS[name]
    if ":" not in name:
        raise ConfigError(f"data.reward={name}: not a registered reward ({', '.join(sorted(REWARDS))}) "
                          f"nor an import path module:function")
    module_name, _, attr = name.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"data.reward={name}: cannot import ({type(e).__name__}: {e})") from None
    if not callable(fn):
        raise ConfigError(f"data.reward={name}: {attr} is not callable")
    return fn


def as_result(value: Any) -> RewardResult:
    """Normalise what a reward function returned into a :class:`RewardResult`."""
    if isinstance(value, RewardResult):
        return value
    if isinstance(value, tuple) and len(value) == 2:
        return RewardResult(float(value[0]), str(value[1]))
    if isinstance(value, (bool, int, float)):
        return RewardResult(float(value), "")
    raise TypeError(f"a reward must return a number, (number, reason) or RewardResult, "
                    f"got {type(value).__name__}")


def call_reward(fn: RewardFn, request: RewardRequest) -> RewardResult:
    """``fn`` on ``request``; an exception becomes a failed result (value 0) saying why."""
    try:
        return as_result(fn(request.response, request.answer, request.question))
    except Exception as e:  # a broken reward must fail one sample, not the step
        return RewardResult(0.0, f"reward raised {type(e).__name__}: {e}", failed=True)
