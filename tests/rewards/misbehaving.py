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
