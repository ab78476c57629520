"""Choosing the next token from logits: temperature, top-k, top-p, seeded (pure torch)."""

from __future__ import annotations

import torch

from .engine import SamplingParams


def sampling_logprobs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Log-probs of the temperature-scaled distribution ``log_softmax(logits / T)``; greedy
    (T = 0) reports T = 1. logits: [vocab] -> [vocab], fp32."""
    scale = temperature if temperature > 0 else 1.0
    return torch.log_softmax(logits.float() / scale, dim=-1)


def truncate(logprobs: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """``logprobs`` with tokens outside the top-k and outside the top-p nucleus set to -inf
    (the most likely token always survives)."""
    out = logprobs
    if 0 < top_k < out.numel():
        kth = torch.topk(out, top_k).values[-1]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_lp, order = torch.sort(out, descending=True)
        probs = sorted_lp.exp()
        # drop a token when the tokens before it already reach top_p
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def sample_token(logits: torch.Tensor, params: SamplingParams,
                 generator: torch.Generator) -> tuple[int, float]:
    """Pick the next token for one sequence; returns (token id, its log-prob under
    :func:`sampling_logprobs`). logits: [vocab]."""
    logprobs = sampling_logprobs(logits, params.temperature)
    if params.temperature <= 0:
        token = int(torch.argmax(logprobs))
    else:
        probs = truncate(logprobs, params.top_k, params.top_p).exp()
        token = int(torch.multinomial(probs, 1, generator=generator))
    return token, float(logprobs[token])
