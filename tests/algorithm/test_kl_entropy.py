import pytest
import torch

from repo_megatron.algorithm import KL_ESTIMATORS, entropy_bonus, kl_penalty

from . import reference
from .inputs import random_batch


# (log_ratio_clamp, k3_clamp): off, binding on many tokens (log-ratios spread 0.2), verl's
@pytest.mark.parametrize("clamps", [(None, None), (0.1, 0.004), (20.0, 10.0)])
@pytest.mark.parametrize("estimator", KL_ESTIMATORS)
def test_kl_estimators_match_float64_reference_in_value_and_gradient(estimator, clamps):
    batch = random_batch(0)
    mask = batch["response_mask"]
    kl = kl_penalty(batch["logprobs"], batch["ref_logprobs"], mask, estimator, *clamps)
    (grad,) = torch.autograd.grad(kl.sum(), batch["logprobs"])

    logp = batch["logprobs"].detach().requires_grad_(True)
    expected = torch.zeros_like(kl)
    for i, t in mask.nonzero().tolist():
        expected[i, t] = reference.kl_token(logp[i, t], batch["ref_logprobs"][i, t], estimator,
                                            *clamps)
    (expected_grad,) = torch.autograd.grad(expected.sum(), logp)
    torch.testing.assert_close(kl, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("estimator", ["k2", "k3"])
def test_k2_and_k3_are_nonnegative_and_zero_when_the_policies_agree(estimator):
    batch = random_batch(1)
    mask = batch["response_mask"]
    assert bool((kl_penalty(batch["logprobs"], batch["ref_logprobs"], mask, estimator) >= 0).all())
    same = kl_penalty(batch["logprobs"], batch["logprobs"].detach(), mask, estimator)
    assert torch.equal(same, torch.zeros_like(same))


def test_k3_averages_to_the_exact_kl_of_two_categoricals():
    g = torch.Generator().manual_seed(0)
    pi = torch.softmax(torch.randn(5, generator=g, dtype=torch.float64), 0)
    ref = torch.softmax(torch.randn(5, generator=g, dtype=torch.float64), 0)
    # the expectation under pi, written as a pi-weighted sum over the 5 outcomes
    k3 = kl_penalty(pi.log()[None], ref.log()[None], torch.ones(1, 5, dtype=torch.bool), "k3")
    torch.testing.assert_close((pi * k3[0]).sum(), (pi * (pi / ref).log()).sum())


def test_unknown_kl_estimator_is_rejected():
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool), "k4")


def test_entropy_bonus_is_minus_coef_times_entropy_on_the_mask():
    batch = random_batch(2)
    mask = batch["response_mask"]
    bonus = entropy_bonus(batch["entropy"], mask, 0.01)
    torch.testing.assert_close(bonus, torch.where(mask, -0.01 * batch["entropy"], 0.0))
