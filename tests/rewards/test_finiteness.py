"""A reward is a finite number: NaN, inf, 1e308, strings... become failed rewards whose reason
is logged (rate-limited), in the worker processes as users run them."""

import logging

import pytest

from repo_megatron.rewards import RewardRequest, RewardRunner
from repo_megatron.rewards.base import bounded, call_reward
from repo_megatron.rewards.runner import RateLimitedLog, failure_kind
from repo_megatron.rollout.metrics import mean
from tests.rewards.misbehaving import by_value

BAD = ["nan", "inf", "-inf", "1e308", "-1e308", "huge_int", "just_beyond", "string", "none",
       "list", "nan_pair", "nan_result", "failed_result_with_nan", "bad_float", "numpy_nan"]
GOOD = {"one": 1.0, "true": 1.0, "numpy_half": 0.5, "pair": 0.25, "int": 3.0, "result": -1.0,
        "edge": 1e6, "tiny": 5e-324}


@pytest.mark.parametrize("name", BAD)
def test_a_value_that_is_not_a_finite_bounded_number_is_a_failed_reward(name):
    result = bounded(call_reward(by_value, RewardRequest(name, "")), max_abs=1e6)
    assert result.failed and result.value == 0.0, result
    assert result.reason and "\n" not in result.reason


def test_reasons_say_what_came_back():
    def reason(name):
        return bounded(call_reward(by_value, RewardRequest(name, "")), 1e6).reason
    assert reason("nan") == "reward returned nan: not a finite number"
    assert reason("1e308") == ("reward returned 1e+308: not a finite number within +-1e+06 "
                               "(data.reward_max_abs)")
    assert reason("string").startswith("reward returned str '0.5': a reward must return a number")
    assert reason("failed_result_with_nan") == "judge down"


@pytest.mark.parametrize("name,value", sorted(GOOD.items()))
def test_finite_numbers_within_the_bound_pass(name, value):
    result = bounded(call_reward(by_value, RewardRequest(name, "")), max_abs=1e6)
    assert not result.failed and result.value == value and type(result.value) is float


def test_the_runner_fails_a_nan_once_in_twenty_calls_and_logs_why(caplog):
    """The issue's case: NaN about once in 20 calls reached the loss; now it is a failed
    reward, in order, with the reason in the log."""
    names = ["one"] * 19 + ["nan"]
    with caplog.at_level(logging.WARNING, logger="repo_megatron.rewards.runner"):
        with RewardRunner("tests.rewards.misbehaving:by_value", timeout_s=10, num_workers=2,
                          max_abs=1e6) as runner:
            results = runner.score([RewardRequest(n, "") for n in names])
            runner.score([RewardRequest("nan", "")])  # same kind, within the minute: counted
    assert [r.failed for r in results] == [False] * 19 + [True]
    assert [r.value for r in results] == [1.0] * 19 + [0.0]
    logged = [r.getMessage() for r in caplog.records]
    assert logged == ["reward tests.rewards.misbehaving:by_value failed for 1 of 20 samples: "
                      "reward returned nan: not a finite number"], logged


def test_failures_are_logged_once_per_kind_per_interval():
    now = [0.0]
    messages = []

    class Sink:
        def warning(self, fmt, *args):
            messages.append(fmt % args)

    rate = RateLimitedLog(Sink(), interval_s=60, clock=lambda: now[0])
    assert rate.warn("timeout", "a timed out")
    assert not rate.warn("timeout", "b timed out", count=3)
    assert rate.warn("raised", "c raised")          # another kind: logged at once
    now[0] = 61.0
    assert rate.warn("timeout", "d timed out")
    assert messages == ["a timed out", "c raised", "d timed out (+3 like it since the last report)"]
    assert failure_kind("reward raised ValueError: x: y") == "reward raised ValueError"


def test_metrics_means_never_raise_on_extreme_values():
    assert mean([1e308, 1e308]) == 1e308
    assert mean([float("inf"), float("-inf")]) != mean([0.0])  # NaN, not a crash
    assert mean([1.0, 2.0]) == 1.5
