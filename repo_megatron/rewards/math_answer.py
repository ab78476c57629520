"""``math``: math-verify parses the final answer and checks equivalence with the reference.

math-verify's own timeouts use SIGALRM (main thread only), so they are switched off here; the
:class:`~repo_megatron.rewards.runner.RewardRunner` enforces the timeout by killing the worker.
"""

from __future__ import annotations

import logging

from .base import RewardResult

# math-verify warns on every call that its timeout is off: we enforce our own.
logging.getLogger("math_verify").setLevel(logging.ERROR)


def parse_reference(answer: str) -> list:
    """The parsed reference; a bare answer (``476``, ``\\frac{1}{2}``) is read as if boxed."""
    from math_verify import parse
    return parse(answer, parsing_timeout=None) or parse(f"\\boxed{{{answer}}}", parsing_timeout=None)


def math_reward(response: str, answer: str, question: str = "") -> RewardResult:
    # imported on first use: only the reward workers score, and math-verify (sympy) costs the
    # trainer process seconds of start-up and ~50 MB
    from math_verify import parse, verify

    gold = parse_reference(answer)
    if not gold:
        return RewardResult(0.0, f"reference answer {answer!r} could not be parsed", failed=True)
    pred = parse(response, parsing_timeout=None)
    if not pred:
        return RewardResult(0.0, "no final answer found")
    if verify(gold, pred, timeout_seconds=None):
        return RewardResult(1.0, f"correct: {pred[-1]}")
    return RewardResult(0.0, f"wrong: got {pred[-1]}, expected {gold[-1]}")


def _import_math_verify() -> None:
    import math_verify  # noqa: F401


math_reward.warm_up = _import_math_verify  # run by each reward worker before it takes calls
