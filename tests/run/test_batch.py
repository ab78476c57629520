"""Groups become micro-batches: alignment, provenance of log-probs, DP slices, corrections."""

import torch

from repo_megatron.algorithm.provenance import PROVENANCES
from repo_megatron.rollout.types import Group, Prompt, Sample
from repo_megatron.run import batch as B
from repo_megatron.run.batching import fixed_plan


def fixed(batch, micro_batch_size, length_multiple=1):
    """``batch`` in micro-batches of ``micro_batch_size`` sequences on one rank."""
    plan = fixed_plan(batch.lengths.tolist(), 1, micro_batch_size, length_multiple)
    return B.micro_batches(batch, plan[0])


def _sample(prompt, response, reward, rephrased=False, logprobs=True, replay=False):
    return Sample(prompt_uid=prompt.uid, prompt_ids=prompt.prompt_ids, response_ids=response,
                  response_text="", reward=reward, reward_reason="", finish_reason="stop",
                  behaviour_logprobs=[-0.5 - i for i in range(len(response))] if logprobs else None,
                  is_rephrased=rephrased, is_replay=replay, is_offpolicy=replay)


def _groups():
    p = Prompt(uid="a", question="q", answer="1", prompt_ids=(5, 6, 7), solution="k")
    q = Prompt(uid="b", question="q", answer="1", prompt_ids=(8, 9), solution=None)
    g1 = Group(p, [_sample(p, [11, 12], 0.0), _sample(p, [13, 14, 15, 16], 1.0, rephrased=True,
                                                           logprobs=False)], injected_index=1)
    g2 = Group(q, [_sample(q, [21], 1.0), _sample(q, [22, 23, 24], 0.0)])
    return [g1, g2]


def test_response_tokens_are_scored_at_the_position_before_them():
    groups = _groups()
    full = B.build_global_batch(groups, B.group_advantages(groups, "grpo", 1e-6), pad_id=0)
    # sample 0: prompt 5 6 7 | response 11 12 -> positions 2 and 3 score 11 and 12
    assert full.tokens[0, :5].tolist() == [5, 6, 7, 11, 12]
    assert full.loss_mask[0].tolist() == [0, 0, 1, 1, 0, 0, 0]
    assert full.behaviour_logprobs[0, 2:4].tolist() == [-0.5, -1.5]
    assert full.lengths.tolist() == [5, 7, 3, 5]


def test_rephrased_trace_is_a_response_to_q_without_behaviour_logprobs():
    groups = _groups()
    full = B.build_global_batch(groups, B.group_advantages(groups, "grpo", 1e-6), pad_id=0)
    assert full.tokens[1, :3].tolist() == [5, 6, 7]          # the ORIGINAL prompt q
    rephrased = PROVENANCES.index("rephrased")
    assert (full.provenance == rephrased).tolist() == [False, True, False, False]
    assert full.sampled_onpolicy.tolist() == [True, False, True, True]  # no behaviour log-probs
    assert full.behaviour_logprobs[1].abs().sum() == 0


def test_advantages_are_group_relative():
    groups = _groups()
    adv = B.group_advantages(groups, "grpo", 1e-6)
    assert adv[0][1] > 0 > adv[0][0] and adv[1][0] > 0 > adv[1][1]
    assert abs(sum(adv[0])) < 1e-9 and abs(sum(adv[1])) < 1e-9


def test_dp_slices_have_equal_micro_batch_counts_and_masked_padding():
    groups = _groups()
    full = B.build_global_batch(groups, B.group_advantages(groups, "grpo", 1e-6), pad_id=0)
    full = full.select(torch.tensor([0, 1, 2]))           # 3 sequences over 2 ranks
    plan = fixed_plan(full.lengths.tolist(), 2, micro_batch_size=1, multiple_of=2)
    shards = [B.micro_batches(full, plan[r]) for r in (0, 1)]
    assert [len(s) for s in shards] == [2, 2]
    assert shards[1][1].loss_mask.sum() == 0 and shards[1][1].lengths.tolist() == [0]
    assert [mb.lengths.tolist() for mb in shards[0] + shards[1][:1]] == [[5], [7], [3]]
    for mb, row in zip(shards[0] + shards[1][:1], range(3)):   # contiguous, in rollout order
        assert torch.equal(mb.tokens[0], full.tokens[row, :mb.seq_length])


def test_micro_batches_are_trimmed_to_their_longest_sequence():
    groups = _groups()
    full = B.build_global_batch(groups, B.group_advantages(groups, "grpo", 1e-6), pad_id=0)
    mbs = fixed(full, 2)
    assert [mb.tokens.shape for mb in mbs] == [torch.Size([2, 7]), torch.Size([2, 5])]
    # no LUFFY expert trace, no replayed sample: the loss gets neither of their terms
    assert mbs[0].is_offpolicy is None and mbs[0].is_replay is None


def test_mismatch_and_tis_ignore_rephrased_samples():
    old = torch.tensor([[0.0, -1.0, -2.0], [0.0, -9.0, -9.0]])
    behaviour = torch.tensor([[0.0, -1.5, -1.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[0, 1, 1], [0, 1, 1]])
    onpolicy = torch.tensor([True, False])                  # row 1: a rephrased trace
    m = B.mismatch_metrics(old, behaviour, mask, onpolicy)
    assert m.tolist() == [1.5, 1.0, 2.0]                      # sum, max, tokens
    w = B.truncated_importance_weights(old, behaviour, mask, onpolicy, cap=1.2)
    assert torch.allclose(w[0], torch.tensor([1.0, 1.2, torch.exp(torch.tensor(-1.0))]))
    assert torch.equal(w[1], torch.ones(3))
    assert torch.equal(B.truncated_importance_weights(old, behaviour, mask, onpolicy, None),
                       torch.ones_like(old))


def test_micro_batches_pad_to_the_length_multiple_with_masked_zeros():
    groups = _groups()
    full = B.build_global_batch(groups, B.group_advantages(groups, "grpo", 1e-6), pad_id=0)
    mbs = fixed(full, 2, length_multiple=16)
    assert [mb.tokens.shape for mb in mbs] == [torch.Size([2, 16]), torch.Size([2, 16])]
    trimmed = fixed(full, 2)
    for padded, mb in zip(mbs, trimmed):
        s = mb.seq_length
        for key in ("tokens", "loss_mask", "behaviour_logprobs"):
            assert torch.equal(getattr(padded, key)[:, :s], getattr(mb, key))
            assert not getattr(padded, key)[:, s:].any(), f"{key}: padding must be zeros"
    # a multiple the longest sequence already meets adds nothing
    assert fixed(full, 4, length_multiple=7)[0].tokens.shape == (4, 7)


def test_the_batch_carries_the_luffy_and_replay_flags_only_when_a_sample_needs_them():
    p = Prompt(uid="a", question="q", answer="1", prompt_ids=(5, 6), solution="k")
    expert = Sample(prompt_uid="a", prompt_ids=p.prompt_ids, response_ids=[7, 8], response_text="",
                    reward=1.0, reward_reason="", finish_reason="expert", is_offpolicy=True)
    luffy = [Group(p, [_sample(p, [9], 0.0), _sample(p, [10], 0.0), expert], injected_index=2)]
    full = B.build_global_batch(luffy, B.group_advantages(luffy, "grpo", 1e-6), pad_id=0)
    assert full.is_offpolicy.tolist() == [False, False, True] and full.is_replay is None
    assert full.sampled_onpolicy.tolist() == [True, True, False]   # the expert was not sampled
    replay = [Group(p, [_sample(p, [9], 0.0), _sample(p, [10], 1.0),
                        _sample(p, [11], 1.0, replay=True), _sample(p, [12], 0.0, replay=True)])]
    full = B.build_global_batch(replay, B.group_advantages(replay, "grpo", 1e-6), pad_id=0)
    # a replayed sample is off-policy but no LUFFY trace: the replay term, not the shaped one
    assert full.is_replay.tolist() == [False, False, True, True] and full.is_offpolicy is None
    assert full.sampled_onpolicy.tolist() == [True, True, False, False]


def _stale_batch(lags):
    """``_groups()``'s batch with its rows ``lags`` weight versions behind the trainer (10)."""
    groups = _groups()
    for sample, lag in zip([s for g in groups for s in g.samples], lags):
        sample.weight_version = 10 - lag
    return B.build_global_batch(groups, B.group_advantages(groups, "grpo", 1e-6), pad_id=0,
                                policy_version=10)


def test_staleness_correction_is_the_identity_at_staleness_0():
    full = _stale_batch([0, 0, 0, 0])
    assert full.staleness.tolist() == [0, 0, 0, 0]
    old = full.behaviour_logprobs + 0.7                    # pi_old far from pi_behaviour
    assert B.behaviour_weights(old, full, tis_cap=None, stale_tis_cap=2.0) is None


def test_stale_onpolicy_tokens_are_weighted_by_the_truncated_behaviour_ratio():
    full = _stale_batch([1, 1, 0, 2])          # rows: on-policy, rephrase, on-policy, on-policy
    assert full.staleness.tolist() == [1, 1, 0, 2]
    shift = torch.tensor([1.0, -0.5]).repeat(full.tokens.shape[1])[:full.tokens.shape[1]]
    old = full.behaviour_logprobs + shift               # ratios e^1 (capped) and e^-0.5
    weights = B.behaviour_weights(old, full, tis_cap=None, stale_tis_cap=1.5)
    # min(pi_old / pi_behaviour, cap) (slime's / verl's TIS, AReaL's decoupled PPO weight)
    expected = torch.exp(old - full.behaviour_logprobs).clamp(max=1.5)
    mask = full.loss_mask.bool()
    for row, stale in enumerate([True, False, False, True]):   # a rephrase has no pi_behaviour
        if stale:
            assert torch.allclose(weights[row][mask[row]], expected[row][mask[row]])
        else:
            assert torch.all(weights[row] == 1)
    assert (weights[mask] > 1.0).any() and (weights[mask] < 1.0).any()   # both sides covered
    # with tis_cap the fresh row takes it, the stale ones their own cap
    both = B.behaviour_weights(old, full, tis_cap=1.1, stale_tis_cap=1.5)
    assert torch.allclose(both[2][mask[2]], expected[2][mask[2]].clamp(max=1.1))
    assert torch.equal(both[0], weights[0])
