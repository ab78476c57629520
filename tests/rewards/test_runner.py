"""The process-pool runner: per-call timeouts, hung and dead workers replaced, order kept."""

import time

import pytest

from repo_megatron.rewards import RewardRequest, RewardRunner

CUE = "tests.rewards.misbehaving:by_cue"


@pytest.fixture(scope="module")
def runner():
    with RewardRunner(CUE, timeout_s=1.5, num_workers=2) as r:
        yield r


def requests(*responses):
    return [RewardRequest(r, "ok") for r in responses]


def test_results_come_back_in_order(runner):
    results = runner.score(requests("ok", "no", "ok", "no", "ok"))
    assert [r.value for r in results] == [1, 0, 1, 0, 1]


def test_a_hanging_reward_times_out_alone_and_its_worker_is_replaced(runner):
    start = time.monotonic()
    results = runner.score(requests("hang", "ok", "ok", "ok"))
    assert results[0].failed and results[0].reason == "reward timed out after 1.5 s"
    assert [r.value for r in results[1:]] == [1, 1, 1]   # the other worker went on meanwhile
    assert time.monotonic() - start < 30
    assert [r.value for r in runner.score(requests("ok", "ok"))] == [1, 1]


def test_a_raising_reward_and_a_dying_worker_fail_only_their_sample(runner):
    raised, died, fine = runner.score(requests("raise", "die", "ok"))
    assert raised.failed and "ValueError: cannot grade" in raised.reason
    assert died.failed and died.reason == "reward worker died (exit code 3)"
    assert fine.value == 1 and not fine.failed


def test_the_timeout_is_per_call_not_per_batch(runner):
    # 6 calls of 0.6 s on 2 workers take ~1.8 s in total, more than the 1.5 s timeout
    results = runner.score(requests(*["slow"] * 6))
    assert not any(r.failed for r in results)


def test_a_bad_reward_name_fails_in_the_trainer_before_any_worker_starts():
    from repo_megatron.errors import ConfigError
    with pytest.raises(ConfigError, match="data.reward=nope"):
        RewardRunner("nope")
