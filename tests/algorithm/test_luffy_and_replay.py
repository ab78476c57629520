import pytest
import torch

from repo_megatron.algorithm import (LossParams, compute_policy_loss, luffy_policy_loss,
                                     luffy_policy_shaping, replay_policy_loss)

from . import reference
from .inputs import random_batch


def test_luffy_shaping_is_p_over_p_plus_gamma():
    p = torch.tensor([1e-4, 0.1, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(luffy_policy_shaping(p.log(), 0.1), p / (p + 0.1))


def test_luffy_gradient_is_minus_a_gamma_p_over_p_plus_gamma_squared():
    batch = random_batch(0)
    mask = batch["response_mask"]
    adv = batch["advantages"][:, None].expand_as(mask)
    loss, _ = luffy_policy_loss(batch["logprobs"], adv, mask, gamma=0.1)
    (grad,) = torch.autograd.grad(loss.sum(), batch["logprobs"])
    p = batch["logprobs"].detach().exp()
    expected = torch.where(mask, -adv * 0.1 * p / (p + 0.1) ** 2, 0.0)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)


def test_luffy_loss_matches_float64_reference():
    batch = random_batch(1)
    mask = batch["response_mask"]
    adv = batch["advantages"][:, None].expand_as(mask)
    loss, metrics = luffy_policy_loss(batch["logprobs"], adv, mask, gamma=0.2)
    expected = torch.zeros_like(loss)
    for i, t in mask.nonzero().tolist():
        logp = batch["logprobs"][i, t].detach()
        expected[i, t] = reference.luffy_token_loss(logp, adv[i, t], 0.2)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(metrics["offpolicy_token_frac"], mask.double())


def test_luffy_tokens_ignore_old_logprobs_and_are_never_clipped():
    batch = random_batch(2)
    is_offpolicy = torch.tensor([0, 0, 1, 1, 0, 0], dtype=torch.bool)
    args = (batch["logprobs"], batch["old_logprobs"], batch["advantages"], batch["response_mask"])
    loss, metrics = compute_policy_loss(*args, is_offpolicy=is_offpolicy)
    moved_old = torch.where(is_offpolicy[:, None], batch["old_logprobs"] - 10,
                            batch["old_logprobs"])
    loss_moved, metrics_moved = compute_policy_loss(*args[:1], moved_old, *args[2:],
                                                    is_offpolicy=is_offpolicy)
    torch.testing.assert_close(loss, loss_moved, rtol=0, atol=0)
    assert metrics_moved["clipfrac_high"] == metrics["clipfrac_high"]
    assert metrics_moved["clipfrac_low"] == metrics["clipfrac_low"]


@pytest.mark.parametrize("log_ratio_clamp", [None, 0.3])  # 0.3 binds (spread 0.5)
def test_replay_term_is_coef_times_clipped_surrogate_of_the_behaviour_ratio(log_ratio_clamp):
    batch = random_batch(3)
    mask = batch["response_mask"]
    adv = batch["advantages"][:, None].expand_as(mask)
    loss, metrics = replay_policy_loss(batch["logprobs"], batch["behaviour_logprobs"], adv,
                                       mask, clip=0.2, coef=0.5, log_ratio_clamp=log_ratio_clamp)
    (grad,) = torch.autograd.grad(loss.sum(), batch["logprobs"])
    logp = batch["logprobs"].detach().requires_grad_(True)
    expected = torch.zeros_like(loss)
    for i, t in mask.nonzero().tolist():
        expected[i, t] = 0.5 * reference.ppo_token_loss(
            logp[i, t], batch["behaviour_logprobs"][i, t], adv[i, t], 0.2, 0.2,
            log_ratio_clamp=log_ratio_clamp)
    (expected_grad,) = torch.autograd.grad(expected.sum(), logp)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)
    assert float(metrics["replay_clipfrac"].sum()) > 0       # the inputs do reach the clip


def test_replay_tokens_use_behaviour_logprobs_not_old_logprobs():
    batch = random_batch(4)
    is_replay = torch.tensor([1, 0, 1, 0, 0, 0], dtype=torch.bool)
    base = dict(is_replay=is_replay, behaviour_logprobs=batch["behaviour_logprobs"],
                params=LossParams(replay_coef=0.7))
    loss, _ = compute_policy_loss(batch["logprobs"], batch["old_logprobs"], batch["advantages"],
                                  batch["response_mask"], **base)
    moved_old = torch.where(is_replay[:, None], batch["old_logprobs"] + 3, batch["old_logprobs"])
    loss_moved, _ = compute_policy_loss(batch["logprobs"], moved_old, batch["advantages"],
                                        batch["response_mask"], **base)
    torch.testing.assert_close(loss, loss_moved, rtol=0, atol=0)


def test_replay_without_behaviour_logprobs_is_rejected():
    batch = random_batch(5)
    with pytest.raises(ValueError, match="behaviour_logprobs"):
        compute_policy_loss(batch["logprobs"], batch["old_logprobs"], batch["advantages"],
                            batch["response_mask"], is_replay=torch.ones(6, dtype=torch.bool))


def test_a_token_both_offpolicy_and_replayed_is_rejected():
    batch = random_batch(6)
    flags = torch.tensor([1, 0, 0, 0, 0, 0], dtype=torch.bool)
    with pytest.raises(ValueError, match="both is_offpolicy"):
        compute_policy_loss(batch["logprobs"], batch["old_logprobs"], batch["advantages"],
                            batch["response_mask"], is_offpolicy=flags, is_replay=flags,
                            behaviour_logprobs=batch["behaviour_logprobs"])
