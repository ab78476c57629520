"""Custom rewards (by import path) that misbehave on cue, for the reward-failure tests."""

import time


def misbehaving(response: str, answer: str, question: str):
    if "HANG" in response:
        time.sleep(60)      # long enough to time out; short-lived if orphaned
    if "RAISE" in response:
        raise RuntimeError("reward bug")
    return float(answer in response), "contains the answer"
