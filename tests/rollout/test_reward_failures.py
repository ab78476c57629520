"""A reward that raises or hangs fails that sample only; the step goes on."""

import pytest

from repo_megatron.rewards import RewardRunner

from .fakes import make_stage, prompt


@pytest.fixture(scope="module")
def runner():
    with RewardRunner("tests.rollout.hanging_rewards:misbehaving", timeout_s=2.0,
                      num_workers=2) as r:
        yield r


def test_raising_and_hanging_rewards_mark_samples_failed_and_the_step_completes(runner):
    replies = iter(["HANG", "RAISE", "476", "1"] * 2)
    stage, _ = make_stage(lambda text, rng: next(replies), injection="none", rewards=runner)
    batch = stage.run([prompt("p", "Compute (23 + 45) * 7.", "476")], step=0)
    (group,) = batch.groups
    hang, raised, right, wrong = group.samples
    assert hang.reward_failed and hang.reward == 0 and "timed out" in hang.reward_reason
    assert raised.reward_failed and "RuntimeError: reward bug" in raised.reward_reason
    assert (right.reward, right.reward_failed) == (1.0, False)
    assert (wrong.reward, wrong.reward_failed) == (0.0, False)
    assert batch.metrics["rollout/reward_failures"] == 2
    # the hung worker was replaced: the runner still scores
    stage.run([prompt("p", "Compute (23 + 45) * 7.", "476")], step=1)
