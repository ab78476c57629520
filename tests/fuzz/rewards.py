"""A reward that returns (or does) whatever its response asks for, for the reward fuzz campaign.

The response is a JSON spec ``{"kind": ..., "value": ...}``; :func:`expected` says what the
trainer must get back for it: ``("ok", value)`` or ``("failed", None)``.
"""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np  # imported with the reward, not inside a timed call

from repo_megatron.rewards import RewardResult


class Real(float):
    """A float subclass (user code returns such things)."""


class BadStr:
    def __str__(self):
        raise RuntimeError("no str for you")


class BadFloat:
    def __float__(self):
        raise OverflowError("too big to say")


def _number(value):
    return {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}.get(value, value)


def fuzzed(response: str, answer: str, question: str):
    spec = json.loads(response)
    kind, value = spec["kind"], _number(spec.get("value"))
    if kind == "number":
        return value
    if kind == "huge_int":
        return 10 ** value
    if kind == "pair":
        return value, spec.get("reason", "why")
    if kind == "pair_bad_reason":
        return value, BadStr()
    if kind == "result":
        return RewardResult(value, spec.get("reason", "r"), failed=spec.get("failed", False))
    if kind == "numpy":
        return getattr(np, spec["dtype"])(value)
    if kind == "real_subclass":
        return Real(value)
    if kind == "bad_float":
        return BadFloat()
    if kind == "other":
        return {"str": "0.5", "none": None, "list": [1.0], "dict": {"v": 1}, "bytes": b"1",
                "tuple3": (1, 2, 3), "complex": 1j}[spec["what"]]
    if kind == "raise":
        raise {"ValueError": ValueError("bad\nmultiline"), "KeyError": KeyError("k"),
               "ZeroDivisionError": ZeroDivisionError(), "RecursionError": RecursionError(),
               "SystemExit": SystemExit(3), "KeyboardInterrupt": KeyboardInterrupt()}[spec["what"]]
    if kind == "sleep":
        time.sleep(value)
        return 1.0
    if kind == "exit":
        os._exit(value)
    raise AssertionError(kind)


def expected(spec: dict, max_abs: float):
    """``("ok", float)`` if the trainer must receive this value, else ``("failed", None)``."""
    import warnings

    kind, value = spec["kind"], _number(spec.get("value"))
    if kind == "huge_int":
        value = 10 ** value
    elif kind == "numpy":
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                value = getattr(np, spec["dtype"])(value)  # what the reward itself returns
        except (ValueError, OverflowError):
            return "failed", None  # the reward raised
    elif kind == "result" and spec.get("failed"):
        return "failed", None
    elif kind not in ("number", "pair", "real_subclass", "result"):
        return "failed", None
    try:
        value = float(value)
    except (OverflowError, TypeError, ValueError):
        return "failed", None
    return ("ok", value) if math.isfinite(value) and abs(value) <= max_abs else ("failed", None)
