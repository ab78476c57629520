"""Staleness of trained samples (rollout.max_staleness): per sample, the bound, the metrics, and
the plain-data round trip that carries rollouts ahead through a checkpoint."""

import io

import pytest
import torch

from repo_megatron.rollout.staleness import check_staleness, staleness, staleness_metrics
from repo_megatron.rollout.types import Group, Prompt, Sample

PROMPT = Prompt(uid="p", question="1+1", answer="2", prompt_ids=(5, 6), solution="k")


def _sample(version, **flags):
    return Sample(prompt_uid="p", prompt_ids=PROMPT.prompt_ids, response_ids=[7, 8],
                  response_text="2", reward=1.0, reward_reason="", finish_reason="stop",
                  behaviour_logprobs=[-0.1, -0.2], weight_version=version, **flags)


def test_staleness_is_the_versions_between_the_sampler_and_the_trainer():
    assert staleness(_sample(3), policy_version=5) == 2
    assert staleness(_sample(5), policy_version=5) == 0
    assert staleness(_sample(None, is_offpolicy=True), policy_version=5) is None  # expert trace


def test_check_staleness_accepts_k_versions_and_refuses_k_plus_one():
    ok = [Group(PROMPT, [_sample(4), _sample(3), _sample(3, is_rephrased=True)])]
    check_staleness(ok, policy_version=5, max_staleness=2, step=6)
    stale = [Group(PROMPT, [_sample(4), _sample(2, is_rephrased=True)])]
    with pytest.raises(RuntimeError, match="version 2 and would be trained at version 5, 3 "
                                           "versions apart; rollout.max_staleness=2"):
        check_staleness(stale, policy_version=5, max_staleness=2, step=6)


def test_check_staleness_refuses_a_sample_from_weights_the_trainer_never_had():
    with pytest.raises(RuntimeError, match="-1 versions apart"):
        check_staleness([Group(PROMPT, [_sample(6)])], policy_version=5, max_staleness=1,
                        step=6)


def test_replayed_and_expert_samples_are_not_bounded_by_staleness():
    groups = [Group(PROMPT, [_sample(5), _sample(0, is_replay=True, is_offpolicy=True),
                             _sample(None, is_offpolicy=True)])]
    check_staleness(groups, policy_version=5, max_staleness=0, step=6)


def test_staleness_metrics_histogram_and_per_provenance_means():
    groups = [Group(PROMPT, [_sample(5), _sample(4), _sample(4), _sample(4, is_rephrased=True),
                             _sample(1, is_replay=True, is_offpolicy=True),
                             _sample(None, is_offpolicy=True)])]
    m = staleness_metrics(groups, policy_version=5, max_staleness=2)
    # on-policy and rephrased: lags 0, 1, 1, 1
    assert m["rollout/staleness_mean"] == 0.75 and m["rollout/staleness_max"] == 1.0
    assert (m["rollout/staleness_0"], m["rollout/staleness_1"], m["rollout/staleness_2"]) == \
        (0.25, 0.75, 0.0)
    assert m["rollout/staleness_onpolicy_mean"] == pytest.approx(2 / 3)
    assert m["rollout/staleness_rephrased_mean"] == 1.0
    assert m["rollout/staleness_replay_mean"] == 4.0   # reported, not bounded
    assert "rollout/staleness_expert_mean" not in m


def test_a_group_round_trips_through_plain_data_for_a_checkpoint():
    replaced = _sample(3)
    group = Group(PROMPT, [_sample(4), _sample(4, is_rephrased=True)], failure_rate=0.5,
                  gate_fired=True, injected_index=1, replaced=replaced,
                  rephrases=[_sample(4, is_rephrased=True)])
    plain = group.to_plain()
    assert Group.from_plain(plain) == group
    buffer = io.BytesIO()                 # checkpoints load trainer state with weights_only
    torch.save(plain, buffer)
    buffer.seek(0)
    assert Group.from_plain(torch.load(buffer, weights_only=True)) == group
