"""Shared pieces of the fuzz campaigns: one case run with a time bound (SIGALRM: main thread,
Unix) and classified, and generators of awkward values."""

from __future__ import annotations

import signal
from typing import Any, Callable

from tests.fuzz.tally import CLEAN_ERROR, HANG, OK, TRACEBACK


class CaseTimeout(BaseException):
    """Raised inside a case that ran past its bound (a BaseException: no ``except Exception``
    in the code under test can swallow it)."""


def _alarm(signum, frame):
    raise CaseTimeout()


def run_case(fn: Callable[[], Any], seconds: float, clean: tuple = ()) -> tuple[str, Any]:
    """``(outcome, value or exception)``: OK with ``fn()``'s value; CLEAN_ERROR for an
    exception of a ``clean`` type with a one-line message; HANG past ``seconds``; TRACEBACK
    for anything else (including a multi-line "clean" message)."""
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return OK, fn()
    except CaseTimeout as e:
        return HANG, e
    except clean as e:  # type: ignore[misc]
        return (CLEAN_ERROR if "\n" not in str(e) and str(e).strip() else TRACEBACK), e
    except BaseException as e:  # noqa: BLE001 (any escape is what the fuzz is looking for)
        return TRACEBACK, e
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def nested(depth: int) -> list:
    """``[[[...]]]``, ``depth`` lists deep."""
    value: list = []
    for _ in range(depth):
        value = [value]
    return value
