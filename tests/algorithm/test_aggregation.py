import functools

import pytest
import torch

from repo_megatron.algorithm import AGG_MODES, LossNormalisers, aggregate_loss

from . import reference
from .inputs import random_batch

NORM_LENGTH = 16


def token_losses(seed):
    """A differentiable per-token loss with garbage on padding, and its mask."""
    batch = random_batch(seed)
    return batch["logprobs"] * batch["entropy"], batch["logprobs"], batch["response_mask"]


def microbatches(tensor, mask, bounds):
    """Rows cut at ``bounds``, each piece trimmed to its own longest response (ragged layout)."""
    pieces = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        width = max(int(mask[start:end].sum(-1).max()), 1)
        pieces.append((tensor[start:end, :width], mask[start:end, :width]))
    return pieces


@pytest.mark.parametrize("mode", AGG_MODES)
def test_each_mode_matches_float64_reference(mode):
    token_loss, logprobs, mask = token_losses(0)
    actual = aggregate_loss(token_loss, mask, mode, loss_norm_length=NORM_LENGTH)
    expected = reference.aggregate(reference.elements(token_loss), mask.tolist(), mode, NORM_LENGTH)
    (grad,) = torch.autograd.grad(actual, logprobs, retain_graph=True)
    (expected_grad,) = torch.autograd.grad(expected, logprobs)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bounds", [[0, 2, 3, 6], [0, 1, 2, 3, 4, 5, 6], [0, 5, 6]])
@pytest.mark.parametrize("mode", AGG_MODES)
def test_microbatches_with_global_normalisers_sum_to_the_full_batch_value_and_gradient(
        mode, bounds):
    token_loss, logprobs, mask = token_losses(1)
    full = aggregate_loss(token_loss, mask, mode, loss_norm_length=NORM_LENGTH)
    (full_grad,) = torch.autograd.grad(full, logprobs, retain_graph=True)

    pieces = microbatches(token_loss, mask, bounds)
    # what the Megatron layer does: sum the counts of every micro-batch (and all-reduce over DP)
    normalisers = functools.reduce(
        LossNormalisers.__add__, (LossNormalisers.from_mask(m) for _, m in pieces))
    split = sum(aggregate_loss(loss, m, mode, normalisers, NORM_LENGTH) for loss, m in pieces)
    (split_grad,) = torch.autograd.grad(split, logprobs)
    torch.testing.assert_close(split, full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(split_grad, full_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_fully_masked_sequences_contribute_nothing_to_value_or_gradient(mode):
    token_loss, logprobs, mask = token_losses(2)
    assert not bool(mask[1].any())                 # row 1 is padding, full of garbage
    with_padding = aggregate_loss(token_loss, mask, mode, loss_norm_length=NORM_LENGTH)
    without = aggregate_loss(token_loss[[0, 2, 3, 4, 5]], mask[[0, 2, 3, 4, 5]], mode,
                             loss_norm_length=NORM_LENGTH)
    (grad,) = torch.autograd.grad(with_padding, logprobs)
    torch.testing.assert_close(with_padding, without, rtol=1e-12, atol=1e-12)
    assert torch.equal(grad[1], torch.zeros_like(grad[1]))
    assert torch.equal(grad[~mask], torch.zeros(int((~mask).sum()), dtype=grad.dtype))


@pytest.mark.parametrize("mode", AGG_MODES)
def test_a_batch_without_response_tokens_gives_zero_loss(mode):
    token_loss = torch.randn(3, 4)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    assert aggregate_loss(token_loss, mask, mode, loss_norm_length=NORM_LENGTH).item() == 0.0


def test_normalisers_count_response_tokens_and_nonempty_sequences():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0]])
    counts = LossNormalisers.from_mask(mask) + LossNormalisers.from_mask(mask[:1])
    assert (int(counts.num_tokens), int(counts.num_sequences)) == (5, 3)


def test_seq_mean_token_sum_norm_divides_by_the_fixed_length_not_the_response_length():
    token_loss = torch.ones(2, 4)
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    # (4/8 + 1/8) / 2 sequences; seq-mean-token-mean would give (1 + 1) / 2
    assert aggregate_loss(token_loss, mask, "seq-mean-token-sum-norm", loss_norm_length=8) == 5 / 16
    assert aggregate_loss(token_loss, mask, "seq-mean-token-mean") == 1.0


def test_unknown_mode_and_missing_norm_length_are_rejected():
    mask = torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="token-mean, seq-mean-token-mean"):
        aggregate_loss(torch.ones(1, 2), mask, "sum")
    with pytest.raises(ValueError, match="loss_norm_length"):
        aggregate_loss(torch.ones(1, 2), mask, "seq-mean-token-sum-norm")
