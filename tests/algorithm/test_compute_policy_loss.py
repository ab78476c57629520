import functools

import pytest
import torch

from repo_megatron.algorithm import AGG_MODES, LossNormalisers, LossParams, compute_policy_loss

from . import reference
from .inputs import random_batch

IS_OFFPOLICY = torch.tensor([0, 0, 1, 0, 0, 0], dtype=torch.bool)   # a LUFFY expert trace
IS_REPLAY = torch.tensor([0, 0, 0, 0, 1, 1], dtype=torch.bool)      # two replayed samples


def params_for(mode):
    return LossParams(clip_low=0.2, clip_high=0.28, dual_clip=3.0, kl_coef=0.05,
                      kl_estimator="k3", entropy_coef=0.01, loss_agg_mode=mode,
                      loss_norm_length=16, luffy_shaping_gamma=0.1, replay_coef=0.5,
                      replay_clip=0.2)


def full_inputs(batch):
    return dict(ref_logprobs=batch["ref_logprobs"], entropy=batch["entropy"],
                is_offpolicy=IS_OFFPOLICY, behaviour_logprobs=batch["behaviour_logprobs"],
                is_replay=IS_REPLAY)


def reference_loss(batch, p):
    """Every term token by token, then the reference aggregation."""
    logp = batch["logprobs"]
    mask = batch["response_mask"]
    token_loss = [[torch.zeros((), dtype=torch.float64)] * mask.shape[1] for _ in mask]
    for i, t in mask.nonzero().tolist():
        adv = batch["advantages"][i]
        if IS_OFFPOLICY[i]:
            pg = reference.luffy_token_loss(logp[i, t], adv, p.luffy_shaping_gamma)
        elif IS_REPLAY[i]:
            pg = p.replay_coef * reference.ppo_token_loss(
                logp[i, t], batch["behaviour_logprobs"][i, t], adv, p.replay_clip, p.replay_clip,
                log_ratio_clamp=p.log_ratio_clamp)
        else:
            pg = reference.ppo_token_loss(logp[i, t], batch["old_logprobs"][i, t], adv,
                                          p.clip_low, p.clip_high, p.dual_clip, p.log_ratio_clamp)
        kl = reference.kl_token(logp[i, t], batch["ref_logprobs"][i, t], p.kl_estimator,
                                p.log_ratio_clamp, p.kl_k3_clamp)
        token_loss[i][t] = pg + p.kl_coef * kl - p.entropy_coef * batch["entropy"][i, t]
    return reference.aggregate(token_loss, mask.tolist(), p.loss_agg_mode, p.loss_norm_length)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_loss_with_every_term_matches_float64_reference_in_value_and_gradient(mode):
    batch = random_batch(0)
    params = params_for(mode)
    loss, _ = compute_policy_loss(batch["logprobs"], batch["old_logprobs"], batch["advantages"],
                                  batch["response_mask"], params=params, **full_inputs(batch))
    (grad,) = torch.autograd.grad(loss, batch["logprobs"])
    expected = reference_loss(batch, params)
    (expected_grad,) = torch.autograd.grad(expected, batch["logprobs"])
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)


def test_verl_clamps_are_what_keeps_an_overflowing_log_ratio_finite():
    """fp32, as the trainer computes the loss: ``exp`` overflows past 88.7. Token (0, 1) has
    ``log pi_theta - log pi_old = 100`` and A < 0 (PPO's unclipped branch ``-A r`` is the
    max); token (1, 0) is one the policy now gives e^-100.5 and the reference e^-0.5 (an
    injected trace can be that unlikely), so k3's ``exp(log pi_ref - log pi_theta)``
    overflows. With the clamps off the loss is inf; with verl's it is verl's value."""
    logprobs = torch.full((2, 3), -0.5)
    logprobs[1, 0] = -100.5
    old = logprobs.clone()
    old[0, 1] = -100.5
    ref = torch.full((2, 3), -0.5)
    advantages = torch.tensor([-1.0, 1.0])
    mask = torch.ones(2, 3, dtype=torch.bool)

    def run(params):
        logp = logprobs.clone().requires_grad_(True)
        loss, _ = compute_policy_loss(logp, old, advantages, mask, params=params,
                                      ref_logprobs=ref)
        (grad,) = torch.autograd.grad(loss, logp)
        return loss, grad

    off, _ = run(LossParams(kl_coef=0.1, log_ratio_clamp=None, kl_k3_clamp=None))
    assert off.item() == float("inf")
    verl = LossParams(kl_coef=0.1)  # the defaults: log-ratios within 20, k3 within 10
    loss, grad = run(verl)
    assert torch.isfinite(loss) and bool(torch.isfinite(grad).all())
    logp = logprobs.double().requires_grad_(True)
    token_loss = [[reference.ppo_token_loss(logp[i, t], old[i, t].double(), advantages[i].double(),
                                            verl.clip_low, verl.clip_high, None, 20.0)
                   + 0.1 * reference.kl_token(logp[i, t], ref[i, t].double(), "k3", 20.0, 10.0)
                   for t in range(3)] for i in range(2)]
    expected = reference.aggregate(token_loss, mask.tolist(), "token-mean")
    (expected_grad,) = torch.autograd.grad(expected, logp)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_microbatches_reproduce_the_full_batch_loss_gradient_and_metrics(mode):
    batch = random_batch(1)
    params = params_for(mode)
    names = ("logprobs", "old_logprobs", "advantages", "response_mask", "ref_logprobs",
             "entropy", "behaviour_logprobs")
    full, full_metrics = compute_policy_loss(
        batch["logprobs"], batch["old_logprobs"], batch["advantages"], batch["response_mask"],
        params=params, **full_inputs(batch))
    (full_grad,) = torch.autograd.grad(full, batch["logprobs"])

    pieces = []
    for rows in (slice(0, 2), slice(2, 3), slice(3, 6)):
        width = max(int(batch["response_mask"][rows].sum(-1).max()), 1)
        piece = {n: batch[n][rows] if n == "advantages" else batch[n][rows, :width] for n in names}
        piece.update(is_offpolicy=IS_OFFPOLICY[rows], is_replay=IS_REPLAY[rows])
        pieces.append(piece)
    normalisers = functools.reduce(
        LossNormalisers.__add__, (LossNormalisers.from_mask(p["response_mask"]) for p in pieces))
    results = [compute_policy_loss(p.pop("logprobs"), p.pop("old_logprobs"),
                                   p.pop("advantages"), p.pop("response_mask"),
                                   params=params, normalisers=normalisers, **p) for p in pieces]
    split = sum(loss for loss, _ in results)
    (split_grad,) = torch.autograd.grad(split, batch["logprobs"])
    torch.testing.assert_close(split, full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(split_grad, full_grad, rtol=1e-12, atol=1e-12)
    for name, value in full_metrics.items():
        torch.testing.assert_close(sum(m[name] for _, m in results), value,
                                   rtol=1e-12, atol=1e-12, msg=name)


def test_per_sequence_advantages_equal_the_same_advantages_given_per_token():
    batch = random_batch(2)
    args = (batch["logprobs"], batch["old_logprobs"])
    per_seq, _ = compute_policy_loss(*args, batch["advantages"], batch["response_mask"])
    per_tok, _ = compute_policy_loss(*args, batch["advantages"][:, None].expand(6, 7),
                                     batch["response_mask"])
    torch.testing.assert_close(per_seq, per_tok, rtol=0, atol=0)


def test_metrics_report_the_pieces_of_the_loss():
    batch = random_batch(3)
    params = params_for("token-mean")
    loss, metrics = compute_policy_loss(batch["logprobs"], batch["old_logprobs"],
                                        batch["advantages"], batch["response_mask"],
                                        params=params, **full_inputs(batch))
    torch.testing.assert_close(
        loss.detach(), metrics["pg_loss"] + params.kl_coef * metrics["kl"]
        - params.entropy_coef * metrics["entropy"], rtol=1e-12, atol=1e-12)
    mask = batch["response_mask"]
    assert float(metrics["offpolicy_token_frac"]) == pytest.approx(
        int(mask[IS_OFFPOLICY].sum()) / int(mask.sum()))
    assert not any(m.requires_grad for m in metrics.values())
