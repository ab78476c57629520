"""Custom rewards for the runner tests, importable by path from worker processes."""

import os
import time


def by_cue(response: str, answer: str, question: str):
    if response == "hang":
        time.sleep(60)      # long enough to time out; short-lived if orphaned
    if response == "raise":
        raise ValueError("cannot grade")
    if response == "die":
        os._exit(3)
    if response == "slow":
        time.sleep(0.6)
    return float(response == answer), f"compared {response!r} with {answer!r}"


def bad_return(response: str, answer: str, question: str):
    return "yes"


NOT_CALLABLE = 3


class _BadFloat:
    """A number whose conversion to float raises."""

    def __float__(self):
        raise ArithmeticError("no float for you")


def returned(response: str):
    """What rewards return when they go wrong, by name (the response names it)."""
    import math

    import numpy as np

    from repo_megatron.rewards import RewardResult

    values = {
        "nan": math.nan, "inf": math.inf, "-inf": -math.inf, "1e308": 1e308, "-1e308": -1e308,
        "huge_int": 10 ** 400, "just_beyond": 1e6 * (1 + 1e-9), "string": "0.5", "none": None,
        "list": [1.0], "nan_pair": (math.nan, "why"), "nan_result": RewardResult(math.nan, "why"),
        "failed_result_with_nan": RewardResult(math.nan, "judge down", failed=True),
        "bad_float": _BadFloat(), "numpy_nan": np.float32("nan"),
        # fine:
        "one": 1.0, "true": True, "numpy_half": np.float32(0.5), "pair": (0.25, "partial"),
        "int": 3, "result": RewardResult(-1.0, "penalty"), "edge": 1e6, "tiny": 5e-324,
    }
    return values[response]


def by_value(response: str, answer: str, question: str):
    return returned(response)


def always_nan(response: str, answer: str, question: str):
    return float("nan")
