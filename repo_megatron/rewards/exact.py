"""``exact``: the final answer (last ``\\boxed{}``, else the last line) equals the reference."""

from __future__ import annotations

import re
from typing import Optional

from .base import RewardResult


def last_boxed(text: str) -> Optional[str]:
    """Content of the last ``\\boxed{...}`` in ``text`` (nested braces allowed), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for i in range(begin, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            if depth == 0:
                return text[begin:i]
            depth -= 1
    return None


def normalise(answer: str) -> str:
    """Whitespace collapsed, surrounding ``$`` and a trailing period removed."""
    return re.sub(r"\s+", " ", answer).strip().strip("$").strip().rstrip(".").strip()


def exact_reward(response: str, answer: str, question: str = "") -> RewardResult:
    boxed = last_boxed(response)
    lines = [line for line in response.splitlines() if line.strip()]
    final = boxed if boxed is not None else (lines[-1] if lines else "")
    got, want = normalise(final), normalise(answer)
    where = "\\boxed{}" if boxed is not None else "last line"
    if got == want:
        return RewardResult(1.0, f"exact match ({where}): {want}")
    return RewardResult(0.0, f"{where} {got!r} != {want!r}")
