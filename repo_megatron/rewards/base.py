"""Reward functions: by registered name or by import path, and one result type.

A reward is ``fn(response: str, answer: str, question: str)`` returning a number (or bool), a
``(value, reason)`` pair or a :class:`RewardResult`. Built-ins are named in :mod:`.registry`;
``module:function`` names any importable function.

A reward is a finite number: anything else (NaN, inf, a string, a number beyond
``data.reward_max_abs``) is a *failed* reward of value 0 whose reason says what came back,
so no non-finite value reaches the advantages, the loss or the weights.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Optional

from ..errors import ConfigError
from ..registry import import_object
from .registry import REWARDS, RewardFn


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


def resolve_reward(name: str) -> RewardFn:
    """The reward registered as ``name`` or the function at import path ``module:function``."""
    if name in REWARDS:
        return REWARDS[name]
    if ":" not in name:
        raise ConfigError(f"data.reward={name}: not a registered reward ({', '.join(REWARDS)}) "
                          f"nor an import path module:function")
    try:
        fn = import_object(name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"data.reward={name}: cannot import ({type(e).__name__}: {e})") from None
    if not callable(fn):
        raise ConfigError(f"data.reward={name}: {name.partition(':')[2]} is not callable")
    return fn


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def as_result(value: Any) -> RewardResult:
    """Normalise what a reward function returned into a :class:`RewardResult` whose value is
    a finite float, or a failed one (value 0) saying what was returned instead."""
    failed, reason = False, ""
    if isinstance(value, RewardResult):
        number, reason, failed = value.value, str(value.reason), bool(value.failed)
    elif isinstance(value, tuple) and len(value) == 2:
        number, reason = value[0], str(value[1])
    else:
        number = value
    if failed:
        return RewardResult(0.0, reason or "reward failed", failed=True)
    if not isinstance(number, numbers.Real):
        return RewardResult(0.0, f"reward returned {type(number).__name__} {_shown(number)}: a "
                                 "reward must return a number, (number, reason) or RewardResult",
                            failed=True)
    try:
        number = float(number)
    except (OverflowError, ValueError, TypeError):
        number = math.nan
    if not math.isfinite(number):
        return RewardResult(0.0, f"reward returned {_shown(value)}: not a finite number",
                            failed=True)
    return RewardResult(number, reason)


def bounded(result: RewardResult, max_abs: float) -> RewardResult:
    """``result``, or a failed result when its value is not finite or beyond ``+-max_abs``
    (``data.reward_max_abs``: larger values overflow the advantages or hide a reward bug)."""
    if result.failed:
        return result if result.value == 0.0 else RewardResult(0.0, result.reason, failed=True)
    if not (isinstance(result.value, float) and abs(result.value) <= max_abs):
        return RewardResult(0.0, f"reward returned {_shown(result.value)}: not a finite number "
                                 f"within +-{max_abs:g} (data.reward_max_abs)", failed=True)
    return result


def call_reward(fn: RewardFn, request: RewardRequest) -> RewardResult:
    """``fn`` on ``request``; an exception becomes a failed result (value 0) saying why."""
    try:
        return as_result(fn(request.response, request.answer, request.question))
    except Exception as e:  # a broken reward must fail one sample, not the step
        return RewardResult(0.0, f"reward raised {type(e).__name__}: {e}", failed=True)
