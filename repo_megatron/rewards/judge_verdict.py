"""Reading an LLM judge's verdict (pure): a strict format first, then a fallback.

The judge is asked to end with ``Verdict: yes|no`` or ``Score: N``. The **strict** reading
takes that line if it is the last non-empty line of the answer (markdown emphasis, a trailing
period and ``N/10`` allowed). The **fallback** takes the last yes/no word (or the last number
in range, with an optional ``/max``) anywhere after the reasoning, so a judge that writes
"The answer is correct. **Yes**" still counts; which reading was used is part of the reason.
Reasoning inside ``<think>...</think>`` is never read. Nothing readable is a failed verdict.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

_THINK = re.compile(r"<think>.*?(</think>|$)", re.DOTALL | re.IGNORECASE)
_EMPHASIS = re.compile(r"[*_`]+")
_YES = {"yes": 1.0, "correct": 1.0, "no": 0.0, "incorrect": 0.0}
_STRICT_YES_NO = re.compile(r"(?:final\s+)?verdict\s*[:=]\s*(yes|no|correct|incorrect)\s*\.?",
                            re.IGNORECASE)
_STRICT_SCORE = re.compile(r"(?:final\s+)?score\s*[:=]\s*(-?\d+(?:\.\d+)?)"
                           r"(?:\s*/\s*(\d+(?:\.\d+)?))?\s*\.?", re.IGNORECASE)
_ANY_YES_NO = re.compile(r"\b(yes|no|correct|incorrect)\b", re.IGNORECASE)
_ANY_SCORE = re.compile(r"(?<![\w.])(-?\d+(?:\.\d+)?)(?:\s*/\s*(\d+(?:\.\d+)?))?(?![\w.])")


@dataclass(frozen=True)
class Verdict:
    """A judge's reading: ``value`` in [0, 1] (None if unreadable) and what was read."""
    value: Optional[float]
    reason: str

    @property
    def ok(self) -> bool:
        return self.value is not None


def visible_text(answer: str) -> str:
    """The answer without reasoning blocks and markdown emphasis."""
    return _EMPHASIS.sub("", _THINK.sub("", answer)).strip()


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _score_value(raw: str, denominator: Optional[str], max_score: float) -> Optional[float]:
    """``raw`` (out of ``denominator`` if the judge wrote one) as a share of ``max_score``;
    None when outside the scale."""
    score, top = float(raw), float(denominator) if denominator else max_score
    if top <= 0 or not 0 <= score <= top:
        return None
    return score / top


def parse_yes_no(answer: str) -> Verdict:
    text = visible_text(answer)
    strict = _STRICT_YES_NO.fullmatch(_last_line(text))
    if strict:
        word = strict.group(1).lower()
        return Verdict(_YES[word], f"verdict {word} (strict)")
    words = _ANY_YES_NO.findall(text)
    if words:
        word = words[-1].lower()
        return Verdict(_YES[word], f"verdict {word} (fallback: last yes/no word)")
    return Verdict(None, f"no verdict in the judge's answer: {_tail(text)!r}")


def parse_score(answer: str, max_score: float) -> Verdict:
    text = visible_text(answer)
    strict = _STRICT_SCORE.fullmatch(_last_line(text))
    if strict:
        value = _score_value(strict.group(1), strict.group(2), max_score)
        if value is None:
            return Verdict(None, f"score {strict.group(0).strip()!r} outside 0..{max_score:g}")
        return Verdict(value, f"score {float(strict.group(1)):g} (strict)")
    for raw, denominator in reversed(_ANY_SCORE.findall(text)):
        value = _score_value(raw, denominator or None, max_score)
        if value is not None:
            return Verdict(value, f"score {float(raw):g} (fallback: last number in range)")
    return Verdict(None, f"no score in the judge's answer: {_tail(text)!r}")


def parse_verdict(answer: str, kind: str, max_score: float = 10.0) -> Verdict:
    """The reward in a judge's ``answer``: ``kind`` is ``yes_no`` or ``score``."""
    return parse_yes_no(answer) if kind == "yes_no" else parse_score(answer, max_score)


def _tail(text: str, limit: int = 120) -> str:
    """The end of ``text`` (where a verdict would be), for failure reasons."""
    text = " ".join(text.split())
    return text if len(text) <= limit else "..." + text[-limit:]
