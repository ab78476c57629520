import pytest
import torch

from repo_megatron.algorithm import compute_advantages

from . import reference


def random_rewards(seed, num_groups=5, group_size=6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_groups, group_size, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("seed", range(3))
def test_grpo_matches_float64_reference_on_random_rewards(seed):
    rewards = random_rewards(seed)
    expected = reference.grpo(rewards.tolist(), eps=1e-6)
    actual = compute_advantages(rewards, estimator="grpo", eps=1e-6)
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)


def test_drgrpo_is_reward_minus_group_mean_without_std():
    rewards = random_rewards(0)
    expected = reference.grpo(rewards.tolist(), eps=1e-6, scale_by_std=False)
    actual = compute_advantages(rewards, estimator="drgrpo")
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)


def test_flat_rewards_with_group_ids_give_the_same_advantages_in_any_order():
    rewards = random_rewards(1)                                          # [5, 6]
    grid = compute_advantages(rewards)
    flat_ids = torch.arange(5).repeat_interleave(6) * 10 + 3             # any integers
    order = torch.randperm(30, generator=torch.Generator().manual_seed(0))
    flat = compute_advantages(rewards.reshape(-1)[order], flat_ids[order])
    torch.testing.assert_close(flat, grid.reshape(-1)[order], rtol=1e-12, atol=1e-12)


def test_groups_of_different_sizes_are_normalised_within_each_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 2.0, 5.0, 3.0, 1.0], dtype=torch.float64)
    ids = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    expected = reference.grpo([[1.0, 0.0, 0.0], [2.0, 5.0], [3.0, 1.0]], eps=1e-6)
    torch.testing.assert_close(compute_advantages(rewards, ids),
                               torch.tensor(sum(expected, []), dtype=torch.float64))


@pytest.mark.parametrize("estimator", ["grpo", "drgrpo"])
@pytest.mark.parametrize("value", [0.0, 1.0, 0.7, -3.1])
def test_all_equal_rewards_give_zero_advantages(estimator, value):
    rewards = torch.full((3, 8), value, dtype=torch.float32)
    rewards[1] = torch.arange(8.0)                                       # one informative group
    advantages = compute_advantages(rewards, estimator=estimator)
    assert torch.equal(advantages[[0, 2]], torch.zeros(2, 8))
    assert bool((advantages[1] != 0).all())


def test_a_group_of_size_one_is_rejected_naming_the_group():
    rewards = torch.tensor([1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match=r"group 7 has 1 sample"):
        compute_advantages(rewards, torch.tensor([3, 3, 7]))


def test_a_grid_with_one_sample_per_group_is_rejected():
    with pytest.raises(ValueError, match=r"group 0 has 1 sample"):
        compute_advantages(torch.ones(4, 1))


def test_split_normalisation_normalises_onpolicy_and_offpolicy_samples_separately():
    rewards = random_rewards(2, num_groups=3, group_size=6)
    is_offpolicy = torch.tensor([[0, 0, 0, 0, 1, 1], [0, 1, 0, 1, 0, 1], [1, 1, 1, 0, 0, 0]],
                                dtype=torch.bool)
    actual = compute_advantages(rewards, estimator="grpo", is_offpolicy=is_offpolicy)
    for g in range(3):
        for part in (False, True):
            cols = (is_offpolicy[g] == part).nonzero().flatten().tolist()
            (expected,) = reference.grpo([[rewards[g, c].item() for c in cols]], eps=1e-6)
            torch.testing.assert_close(actual[g, cols], torch.tensor(expected, dtype=torch.float64))


def test_split_normalisation_differs_from_normalising_the_mixed_group():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0, 1.0, 1.0]])
    is_offpolicy = torch.tensor([[0, 0, 0, 0, 1, 1]], dtype=torch.bool)
    split = compute_advantages(rewards, is_offpolicy=is_offpolicy)
    assert torch.equal(split[0, 4:], torch.zeros(2))   # both replayed samples equal: no signal
    assert not torch.allclose(split, compute_advantages(rewards))


def test_split_part_with_a_single_sample_is_rejected_naming_the_part():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    is_offpolicy = torch.tensor([[0, 0, 0, 1]], dtype=torch.bool)
    with pytest.raises(ValueError, match=r"group 0 \(off-policy part\) has 1 sample"):
        compute_advantages(rewards, is_offpolicy=is_offpolicy)


def test_advantages_keep_the_shape_and_dtype_of_the_rewards():
    rewards = random_rewards(3).to(torch.float32)
    advantages = compute_advantages(rewards)
    assert advantages.shape == rewards.shape and advantages.dtype == torch.float32


def test_mismatched_flat_inputs_are_rejected():
    with pytest.raises(ValueError, match=r"must both be \[N\]"):
        compute_advantages(torch.ones(4), torch.tensor([0, 0, 1]))
