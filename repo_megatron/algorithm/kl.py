"""Per-token estimators of KL(pi_theta || pi_ref), from Schulman's "Approximating KL divergence".

With ``log_r = log pi_ref(o_t) - log pi_theta(o_t)`` on tokens sampled from the policy:

- ``k1 = -log_r``                  unbiased, high variance, can be negative;
- ``k2 = log_r^2 / 2``             biased, low variance, >= 0;
- ``k3 = exp(log_r) - 1 - log_r``  unbiased, low variance, >= 0 (GRPO's choice).

k3 is the one with an ``exp``: as verl's ``kl_penalty_forward`` ("low_var_kl"/"k3") does,
``log_r`` may be clamped before it and the estimate after it (``algorithm.log_ratio_clamp``,
``algorithm.kl_k3_clamp``): one token the policy has moved far from the reference otherwise
gives ``inf``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .masking import masked_log_ratio

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, estimator: str = "k3",
               log_ratio_clamp: Optional[float] = None,
               k3_clamp: Optional[float] = None) -> Tensor:
    """Per-token KL estimate ``[batch, seq]``, 0 outside ``mask``; multiply by beta to use it.

    k3 only: ``log_r`` is clamped to ``[-log_ratio_clamp, log_ratio_clamp]`` and the estimate
    to ``[-k3_clamp, k3_clamp]`` (None = no clamp; no gradient where a clamp binds)."""
    if estimator == "k1":
        return -masked_log_ratio(ref_logprobs, logprobs, mask)
    if estimator == "k2":
        return 0.5 * masked_log_ratio(ref_logprobs, logprobs, mask) ** 2
    if estimator == "k3":
        log_r = masked_log_ratio(ref_logprobs, logprobs, mask, log_ratio_clamp)  # [batch, seq]
        k3 = torch.exp(log_r) - 1 - log_r
        return k3 if k3_clamp is None else torch.clamp(k3, min=-k3_clamp, max=k3_clamp)
    raise ValueError(f"kl_estimator={estimator!r} must be one of {', '.join(KL_ESTIMATORS)}")
