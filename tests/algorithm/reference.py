"""Straightforward float64 re-computations, written element by element, to test against.

They use 0-dim float64 tensors (not python floats) only so that autograd can give reference
gradients; the formulas are the papers' case-by-case forms, not the library's vectorised ones.

The clamps are verl's (volcengine/verl, ``verl/trainer/ppo/core_algos.py``):
``compute_policy_loss_vanilla`` clamps ``negative_approx_kl = log_prob - old_log_prob`` to
``[-20, 20]`` before ``exp``; ``kl_penalty_forward`` ("low_var_kl"/"k3") clamps ``kl = ref_logprob
- logprob`` to ``[-20, 20]``, then ``kld = exp(kl) - kl - 1`` to ``[-10, 10]``. Here the bounds
are arguments (None = verl's formula without that clamp).
"""

from __future__ import annotations

import statistics

import torch


def grpo(groups: list[list[float]], eps: float, scale_by_std: bool = True) -> list[list[float]]:
    """(R_i - mean) / (stdev + eps) per group; stdev with Bessel's correction."""
    out = []
    for rewards in groups:
        mean = sum(rewards) / len(rewards)
        std = statistics.stdev(rewards)
        out.append([(r - mean) / (std + eps) if scale_by_std else r - mean for r in rewards])
    return out


def _clamp(x, bound):
    return x if bound is None else torch.clamp(x, min=-bound, max=bound)


def ppo_token_loss(logp, old, adv, clip_low, clip_high, dual_clip=None, log_ratio_clamp=None):
    """One token: the case-split form of PPO clip (and dual-clip), on verl's clamped ratio."""
    ratio = torch.exp(_clamp(logp - old, log_ratio_clamp))
    if adv >= 0:
        loss = -adv * torch.minimum(ratio, torch.tensor(1 + clip_high, dtype=torch.float64))
    else:
        loss = -adv * torch.maximum(ratio, torch.tensor(1 - clip_low, dtype=torch.float64))
        if dual_clip is not None and ratio > dual_clip:
            loss = -adv * dual_clip + 0 * ratio
    return loss


def kl_token(logp, ref, estimator, log_ratio_clamp=None, k3_clamp=None):
    """KL(pi || ref) estimate of one token sampled from pi (verl's clamps on k3 only)."""
    log_r = ref - logp
    if estimator == "k1":
        return logp - ref
    if estimator == "k2":
        return log_r * log_r / 2
    log_r = _clamp(log_r, log_ratio_clamp)
    return _clamp(torch.exp(log_r) - 1 - log_r, k3_clamp)


def luffy_token_loss(logp, adv, gamma):
    p = torch.exp(logp)
    return -adv * p / (p + gamma)


def aggregate(token_loss, mask, mode, norm_length=None):
    """token_loss: [B][S] 0-dim tensors; mask: [B][S] bools."""
    total = torch.zeros((), dtype=torch.float64)
    num_tokens = sum(m for row in mask for m in row)
    num_seqs = sum(1 for row in mask if any(row))
    for row_loss, row_mask in zip(token_loss, mask):
        seq_sum = torch.zeros((), dtype=torch.float64)
        for loss, m in zip(row_loss, row_mask):
            if m:
                seq_sum = seq_sum + loss
        if mode == "token-mean":
            total = total + seq_sum / max(num_tokens, 1)
        elif mode == "seq-mean-token-mean":
            total = total + seq_sum / max(sum(row_mask), 1) / max(num_seqs, 1)
        elif mode == "seq-mean-token-sum":
            total = total + seq_sum / max(num_seqs, 1)
        else:
            total = total + seq_sum / norm_length / max(num_seqs, 1)
    return total


def elements(t: torch.Tensor) -> list[list[torch.Tensor]]:
    """[B, S] tensor as nested lists of 0-dim tensors (keeping the autograd graph)."""
    return [[t[i, j] for j in range(t.shape[1])] for i in range(t.shape[0])]
