"""Random micro-batches for the tests: ragged responses, one fully masked row, garbage padding."""

from __future__ import annotations

import torch

GARBAGE = 40.0  # padding values far from any real log-prob: must never leak into loss or grad


def random_batch(seed: int, batch: int = 6, seq: int = 7) -> dict[str, torch.Tensor]:
    """float64 ``[batch, seq]`` tensors; ``logprobs`` requires grad; row 1 is fully masked."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, seq + 1, (batch,), generator=g)
    lengths[1] = 0
    mask = torch.arange(seq)[None, :] < lengths[:, None]                  # [batch, seq]
    old = -3 * torch.rand(batch, seq, generator=g, dtype=torch.float64)
    # spread of 0.3 in log-ratio: many tokens fall outside [0.8, 1.28]
    logprobs = old + 0.3 * torch.randn(batch, seq, generator=g, dtype=torch.float64)
    out = {
        "logprobs": logprobs.clamp(max=0),
        "old_logprobs": old,
        "ref_logprobs": old + 0.2 * torch.randn(batch, seq, generator=g, dtype=torch.float64),
        "behaviour_logprobs": old + 0.5 * torch.randn(batch, seq, generator=g,
                                                      dtype=torch.float64),
        "entropy": 2 * torch.rand(batch, seq, generator=g, dtype=torch.float64),
        "advantages": torch.randn(batch, generator=g, dtype=torch.float64),
    }
    for name in ("logprobs", "old_logprobs", "ref_logprobs", "behaviour_logprobs", "entropy"):
        sign = 1 if name == "logprobs" else -1
        out[name] = torch.where(mask, out[name], torch.full_like(out[name], sign * GARBAGE))
    out["logprobs"].requires_grad_(True)
    out["response_mask"] = mask
    return out
