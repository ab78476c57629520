"""Choosing the next tokens from logits: temperature, top-k, top-p, seeded per row (pure torch).

Sampling is by inverse CDF: each row draws one uniform number from its own generator and the
rest is batched, so a row's token depends only on its logits and its generator.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .base import SamplingParams


def sampling_logprobs(logits: torch.Tensor, temperatures: torch.Tensor) -> torch.Tensor:
    """``log_softmax(logits / T)`` per row; greedy rows (T = 0) report T = 1.
    logits: [n, vocab], temperatures: [n] -> [n, vocab] fp32."""
    scale = torch.where(temperatures > 0, temperatures, torch.ones_like(temperatures))
    return torch.log_softmax(logits.float() / scale[:, None], dim=-1)


def nucleus_mask(sorted_probs: torch.Tensor, top_k: torch.Tensor,
                 top_p: torch.Tensor) -> torch.Tensor:
    """Which tokens of each row (sorted by descending probability) survive top-k and top-p:
    the first ``top_k`` and those whose predecessors hold less than ``top_p`` of the mass (the
    most likely token always survives). sorted_probs: [n, vocab]; top_k, top_p: [n]."""
    rank = torch.arange(sorted_probs.shape[-1])[None, :]
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    return (rank < top_k[:, None]) & ((mass_before < top_p[:, None]) | (rank == 0))


def truncation_mask(probs: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Which tokens survive each row's top-k and top-p, in vocabulary order. probs: [n, vocab]."""
    vocab = probs.shape[-1]
    if not any(0 < p.top_k < vocab or p.top_p < 1.0 for p in params):
        return torch.ones_like(probs, dtype=torch.bool)
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params])
    top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32)
    keep_sorted = nucleus_mask(sorted_probs, top_k, top_p)
    return torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)


def sample_tokens(logits: torch.Tensor, params: Sequence[SamplingParams],
                  generators: Sequence[torch.Generator]) -> tuple[list[int], list[float]]:
    """The next token of each row and its log-prob under :func:`sampling_logprobs` (the
    temperature-scaled distribution before truncation). logits: [n, vocab]."""
    vocab = logits.shape[-1]
    temperatures = torch.tensor([p.temperature for p in params], dtype=torch.float32)
    logprobs = sampling_logprobs(logits, temperatures)                        # [n, vocab]
    uniform = torch.stack([torch.rand((), generator=g) for g in generators])  # [n]
    probs = logprobs.exp()
    keep = truncation_mask(probs, params)
    # the CDF runs in vocabulary order: float noise in the logits (another batch, another
    # padding) then moves a row's pick only if u lands within that noise of a boundary
    cdf = (probs * keep).cumsum(-1)                                           # [n, vocab]
    picked = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None], right=True)[:, 0]
    last_kept = torch.where(keep, torch.arange(vocab), -1).max(-1).values
    tokens = torch.minimum(picked, last_kept)     # u * total rounding up to the total
    tokens = torch.where(temperatures > 0, tokens, logprobs.argmax(-1))
    return tokens.tolist(), logprobs.gather(1, tokens[:, None])[:, 0].tolist()
