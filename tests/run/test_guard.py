"""The run guard: when a run stops instead of training on NaN or on a reward that always fails."""

import pytest

from repo_megatron.run.guard import RunGuard, TrainingStopped


def test_nonfinite_steps_in_a_row_stop_the_run_at_the_limit():
    guard = RunGuard(max_nonfinite_steps=3, max_failed_reward_steps=0)
    guard.check(1, {"train/nonfinite_in_a_row": 2.0})
    with pytest.raises(TrainingStopped, match=r"^step 2: 3 optimizer steps in a row had a "
                                              r"non-finite loss or gradient \(optimizer."
                                              r"max_nonfinite_steps=3\)"):
        guard.check(2, {"train/nonfinite_in_a_row": 3.0})


def test_a_reward_failing_every_call_stops_the_run_after_n_steps_in_a_row():
    guard = RunGuard(max_nonfinite_steps=3, max_failed_reward_steps=2)
    all_failed = {"rollout/reward_calls": 8.0, "rollout/reward_failures": 8.0}
    guard.check(1, all_failed)
    guard.check(2, {"rollout/reward_calls": 8.0, "rollout/reward_failures": 7.0})  # resets
    guard.check(3, all_failed)
    with pytest.raises(TrainingStopped) as stop:
        guard.check(4, all_failed, "reward returned nan: not a finite number")
    assert str(stop.value) == ("step 4: every reward call failed in 2 steps in a row "
                               "(data.max_failed_reward_steps=2); e.g. reward returned nan: "
                               "not a finite number")


def test_failing_rewards_never_stop_the_run_when_the_limit_is_zero():
    guard = RunGuard(max_nonfinite_steps=3, max_failed_reward_steps=0)
    for step in range(10):
        guard.check(step, {"rollout/reward_calls": 4.0, "rollout/reward_failures": 4.0})
