"""Choosing the next tokens from logits: temperature, top-k, top-p, seeded per row (pure torch).

Sampling is by inverse CDF: each row draws one uniform number from its own generator and the
rest is batched, so a row's token depends only on its logits and its generator.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .engine import SamplingParams


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


def sample_tokens(logits: torch.Tensor, params: Sequence[SamplingParams],
                  generators: Sequence[torch.Generator]) -> tuple[list[int], list[float]]:
    """The next token of each row and its log-prob under :func:`sampling_logprobs` (the
    temperature-scaled distribution before truncation). logits: [n, vocab]."""
    vocab = logits.shape[-1]
    temperatures = torch.tensor([p.temperature for p in params], dtype=torch.float32)
    logprobs = sampling_logprobs(logits, temperatures)                        # [n, vocab]
    uniform = torch.stack([torch.rand((), generator=g) for g in generators])  # [n]
    # always in descending order, so a row's token never depends on its batch mates' params
    probs, order = torch.sort(logprobs.exp(), dim=-1, descending=True)       # [n, vocab]
    top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in params])
    top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32)
    keep = nucleus_mask(probs, top_k, top_p)
    cdf = (probs * keep).cumsum(-1)
    # right=True: the first token whose cdf exceeds u * total, never one of zero probability
    picked = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None], right=True)[:, 0]
    picked = torch.minimum(picked, keep.sum(-1) - 1)   # u * total rounding up to the total
    tokens = order.gather(1, picked[:, None])[:, 0]
    tokens = torch.where(temperatures > 0, tokens, logprobs.argmax(-1))
    return tokens.tolist(), logprobs.gather(1, tokens[:, None])[:, 0].tolist()
