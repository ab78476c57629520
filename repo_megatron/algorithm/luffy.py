"""LUFFY's policy shaping for off-policy (expert) tokens (Yan et al. 2025, "Learning to Reason
under Off-Policy Guidance").

An expert trace was not sampled by any version of the policy, so there is no old log-prob to
form a ratio with. LUFFY uses the current probability itself, reshaped by
``f(p) = p / (p + gamma)``: ``d f / d log p = gamma p / (p + gamma)^2`` keeps the gradient of
low-probability expert tokens from vanishing (plain ``p`` would give ``p``), which is both the
point of the method and the source of the instability RePO avoids. No clip is applied.
"""

from __future__ import annotations

import torch
from torch import Tensor


def luffy_policy_shaping(logprobs: Tensor, gamma: float) -> Tensor:
    """``f(p) = p / (p + gamma)`` with ``p = exp(logprobs)``, elementwise."""
    p = torch.exp(logprobs)
    return p / (p + gamma)


def luffy_policy_loss(logprobs: Tensor, advantages: Tensor, mask: Tensor,
                      gamma: float) -> tuple[Tensor, dict[str, Tensor]]:
    """``-A * f(pi_theta(o_t))`` on the off-policy tokens ``mask``, 0 elsewhere. [batch, seq]

    Per-token metrics (0 outside ``mask``): ``offpolicy_token_frac`` (1 on these tokens) and
    ``offpolicy_prob`` (``p``; divide its token-mean by ``offpolicy_token_frac`` for the mean
    probability of an expert token).
    """
    zeros = torch.zeros_like(logprobs)
    safe_logprobs = torch.where(mask, logprobs, zeros)  # see masking.py: no overflow off-mask
    loss = torch.where(mask, -advantages * luffy_policy_shaping(safe_logprobs, gamma), zeros)
    metrics = {"offpolicy_token_frac": mask.to(logprobs.dtype),
               "offpolicy_prob": torch.where(mask, torch.exp(safe_logprobs), zeros)}
    return loss, metrics
