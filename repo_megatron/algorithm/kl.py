"""Per-token estimators of KL(pi_theta || pi_ref), from Schulman's "Approximating KL divergence".

With ``log_r = log pi_ref(o_t) - log pi_theta(o_t)`` on tokens sampled from the policy:

- ``k1 = -log_r``                  unbiased, high variance, can be negative;
- ``k2 = log_r^2 / 2``             biased, low variance, >= 0;
- ``k3 = exp(log_r) - 1 - log_r``  unbiased, low variance, >= 0 (GRPO's choice).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .masking import masked_log_ratio

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor,
               estimator: str = "k3") -> Tensor:
    """Per-token KL estimate ``[batch, seq]``, 0 outside ``mask``; multiply by beta to use it."""
    log_r = masked_log_ratio(ref_logprobs, logprobs, mask)                   # [batch, seq]
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r ** 2
    if estimator == "k3":
        return torch.exp(log_r) - 1 - log_r
    raise ValueError(f"kl_estimator={estimator!r} must be one of {', '.join(KL_ESTIMATORS)}")
