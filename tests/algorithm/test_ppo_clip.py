import pytest
import torch

from repo_megatron.algorithm import LossParams, clipped_surrogate, ppo_clip_loss

from . import reference
from .inputs import random_batch


def per_token_advantages(batch):
    return batch["advantages"][:, None].expand_as(batch["logprobs"])


@pytest.mark.parametrize("log_ratio_clamp", [None, 0.1, 20.0])  # 0.1 binds on many tokens
@pytest.mark.parametrize("dual_clip", [None, 1.1, 3.0])
@pytest.mark.parametrize("seed", range(2))
def test_ppo_clip_matches_float64_reference_in_value_and_gradient(seed, dual_clip,
                                                                  log_ratio_clamp):
    batch = random_batch(seed)
    params = LossParams(clip_low=0.2, clip_high=0.28, dual_clip=dual_clip,
                        log_ratio_clamp=log_ratio_clamp)
    adv = per_token_advantages(batch)
    loss, _ = ppo_clip_loss(batch["logprobs"], batch["old_logprobs"], adv,
                            batch["response_mask"], params)
    (grad,) = torch.autograd.grad(loss.sum(), batch["logprobs"])

    logp = batch["logprobs"].detach().requires_grad_(True)
    mask = batch["response_mask"]
    expected = torch.zeros_like(loss)
    for i in range(mask.shape[0]):
        for t in range(mask.shape[1]):
            if mask[i, t]:
                expected[i, t] = reference.ppo_token_loss(logp[i, t], batch["old_logprobs"][i, t],
                                                          adv[i, t], 0.2, 0.28, dual_clip,
                                                          log_ratio_clamp)
    (expected_grad,) = torch.autograd.grad(expected.sum(), logp)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)


def test_clip_higher_uses_separate_lower_and_upper_bounds():
    log_ratio = torch.log(torch.tensor([1.25, 1.25, 0.75, 0.75], dtype=torch.float64))
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0], dtype=torch.float64)
    loss_higher, _ = clipped_surrogate(log_ratio, adv, clip_low=0.2, clip_high=0.28)
    loss_symmetric, _ = clipped_surrogate(log_ratio, adv, clip_low=0.2, clip_high=0.2)
    # r = 1.25 passes the upper bound 1.28 but not 1.2; r = 0.75 is below 0.8 in both
    torch.testing.assert_close(loss_higher, torch.tensor([-1.25, -1.25, 0.8, 0.8],
                                                         dtype=torch.float64))
    torch.testing.assert_close(loss_symmetric, torch.tensor([-1.2, -1.2, 0.8, 0.8],
                                                            dtype=torch.float64))


def test_dual_clip_caps_the_loss_of_negative_advantage_tokens_at_minus_a_times_c():
    log_ratio = torch.log(torch.tensor([5.0, 5.0, 2.0], dtype=torch.float64)).requires_grad_(True)
    adv = torch.tensor([-2.0, 2.0, -2.0], dtype=torch.float64)
    loss, metrics = clipped_surrogate(log_ratio, adv, 0.2, 0.28, dual_clip=3.0)
    # A < 0, r = 5 > c: capped at -A c = 6 with no gradient; A > 0: the upper clip; r = 2 < c
    torch.testing.assert_close(loss, torch.tensor([6.0, -2.56, 4.0], dtype=torch.float64))
    (grad,) = torch.autograd.grad(loss.sum(), log_ratio)
    torch.testing.assert_close(grad, torch.tensor([0.0, 0.0, 4.0], dtype=torch.float64))
    assert metrics["clipfrac_dual"].tolist() == [1.0, 0.0, 0.0]


def test_clip_fractions_flag_the_tokens_where_each_bound_is_active():
    ratio = torch.tensor([1.5, 1.5, 0.5, 0.5, 1.0, 4.0], dtype=torch.float64)
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0, 1.0, -1.0], dtype=torch.float64)
    _, metrics = clipped_surrogate(torch.log(ratio), adv, 0.2, 0.28, dual_clip=3.0)
    # high: A > 0 and r > 1.28; low: A < 0 and r < 0.8; dual: A < 0 and r > c.
    # (r = 1.5 with A < 0, or r = 0.5 with A > 0, is not clipped: min() keeps the raw term)
    assert metrics["clipfrac_high"].tolist() == [1, 0, 0, 0, 0, 0]
    assert metrics["clipfrac_low"].tolist() == [0, 0, 1, 0, 0, 0]
    assert metrics["clipfrac_dual"].tolist() == [0, 0, 0, 0, 0, 1]


def test_ppo_kl_is_old_minus_new_log_prob_on_the_mask():
    batch = random_batch(4)
    _, metrics = ppo_clip_loss(batch["logprobs"], batch["old_logprobs"],
                               per_token_advantages(batch), batch["response_mask"], LossParams())
    mask = batch["response_mask"]
    expected = torch.where(mask, batch["old_logprobs"] - batch["logprobs"].detach(), 0.0)
    torch.testing.assert_close(metrics["ppo_kl"].detach(), expected)


def test_masked_tokens_contribute_no_loss_and_no_gradient_even_with_huge_log_ratios():
    batch = random_batch(5)   # padding holds log-ratios of +80: exp would overflow in float32
    mask = batch["response_mask"]
    logprobs = batch["logprobs"].detach().float().requires_grad_(True)
    loss, metrics = ppo_clip_loss(logprobs, batch["old_logprobs"].float(),
                                  per_token_advantages(batch).float(), mask, LossParams())
    (grad,) = torch.autograd.grad(loss.sum(), logprobs)
    assert torch.equal(loss[~mask], torch.zeros(int((~mask).sum())))
    assert torch.equal(grad[~mask], torch.zeros(int((~mask).sum())))
    assert bool(torch.isfinite(grad).all())
    assert all(torch.equal(m[~mask], torch.zeros(int((~mask).sum()))) for m in metrics.values())
