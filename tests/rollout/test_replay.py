"""Replay-Enhanced PO: the per-prompt FIFO buffer and each retrieval strategy."""

import random

import pytest

from repo_megatron.rollout.replay import RETRIEVALS, ReplayBuffer
from repo_megatron.rollout.types import Sample

from .fakes import make_stage, prompt


def past(reward, n, uid="p"):
    return Sample(uid, (1,), [n], f"#{n}", reward, "", "stop", behaviour_logprobs=[-1.0],
                  weight_version=n)


ENTRIES = [past(r, n) for n, r in enumerate([0.0, 1.0, 0.0, 1.0, 0.5, 0.0])]   # oldest first


def names(samples):
    return [s.response_text for s in samples]


def test_recency_takes_the_newest():
    assert names(RETRIEVALS.get("recency")(ENTRIES, 2, random.Random(0))) == ["#4", "#5"]


def test_reward_takes_the_highest_newest_first_on_ties():
    assert names(RETRIEVALS.get("reward")(ENTRIES, 3, random.Random(0))) == ["#3", "#1", "#4"]


def test_variance_takes_the_max_variance_subset():
    chosen = RETRIEVALS.get("variance")(ENTRIES, 2, random.Random(0))
    assert sorted(s.reward for s in chosen) == [0.0, 1.0]
    assert names(chosen) == ["#3", "#5"]            # the newest of each reward, buffer order
    chosen4 = RETRIEVALS.get("variance")(ENTRIES, 4, random.Random(0))
    assert sorted(s.reward for s in chosen4) == [0.0, 0.0, 1.0, 1.0]


def test_random_is_reproducible_with_its_seed_and_without_repeats():
    pick = RETRIEVALS.get("random")
    a, b = pick(ENTRIES, 3, random.Random(5)), pick(ENTRIES, 3, random.Random(5))
    assert names(a) == names(b) and len(set(names(a))) == 3
    draws = {tuple(names(pick(ENTRIES, 3, random.Random(s)))) for s in range(20)}
    assert len(draws) > 1


def test_buffer_is_a_per_prompt_fifo_with_a_minimum_size():
    buffer = ReplayBuffer(capacity=3, strategy="recency", min_size=2)
    buffer.add([past(0.0, 0)])
    assert buffer.retrieve("p", 2, random.Random(0)) == []            # below min_size
    buffer.add([past(0.0, n) for n in (1, 2, 3)] + [past(1.0, 9, uid="other")])
    replayed = buffer.retrieve("p", 5, random.Random(0))
    assert names(replayed) == ["#1", "#2", "#3"]                        # #0 fell out
    assert all(s.is_replay and s.is_offpolicy and s.logprobs_valid for s in replayed)
    assert len(buffer) == 4


def test_buffer_keeps_only_samples_with_behaviour_logprobs():
    buffer = ReplayBuffer(capacity=4, strategy="recency", min_size=1)
    rephrased = Sample("p", (1,), [1], "r", 1.0, "", "stop", is_rephrased=True)
    buffer.add([rephrased, past(0.0, 1)])
    assert names(buffer.retrieve("p", 4, random.Random(0))) == ["#1"]


@pytest.mark.parametrize("strategy", ["recency", "reward", "variance", "random"])
def test_stage_replays_past_rollouts_from_the_second_step(strategy):
    hard = prompt("hard", "Compute (23 + 45) * 7.", "476")
    stage, _ = make_stage(lambda text, rng: f"\\boxed{{{rng.choice(['476', '1'])}}}",
                          injection="none", replay={"enabled": True, "strategy": strategy,
                                                    "samples_per_prompt": 2, "min_buffer_size": 2})
    (first,) = stage.run([hard], step=0).groups
    assert len(first.samples) == 4
    batch = stage.run([hard], step=1)
    (second,) = batch.groups
    replayed = [s for s in second.samples if s.is_replay]
    assert len(second.samples) == 6 and len(replayed) == 2
    assert all(s.response_ids in [f.response_ids for f in first.samples] for s in replayed)
    assert all(s.logprobs_valid for s in replayed)
    assert len(second.grpo_samples) == 4
    assert batch.metrics["rollout/replayed_samples"] == 2
