"""Per-provenance training metrics: which kind of sample drove the update, and how far each
kind sits from the current policy.

Every sequence of a step has one provenance (:data:`PROVENANCES`): an ``onpolicy`` rollout of
q, a ``rephrased`` RePO trace (sampled under P(q, k), trained under q), an ``expert`` LUFFY trace
(not sampled at all) or a ``replay`` ed sample from an earlier step. For each kind,
:func:`provenance_sums` gives additive sums over one micro-batch (so they add up across
micro-batches and data-parallel ranks like the loss's other metrics) and
:func:`finalize_provenance_metrics` turns the step's totals into counts and means:

- ``sequences``, ``tokens``: how many samples / response tokens of the kind were trained on;
- ``advantage``: mean over the kind's sequences of their (token-mean) advantage;
- ``nll``: per-token negative log-likelihood ``-log pi_theta(o_t | q, o_<t)`` under the current
  policy and the ORIGINAL prompt q: how foreign the kind's text is to the policy (RePO's claim:
  rephrased traces sit much closer to the policy than raw expert traces);
- ``ratio``: mean ``pi_theta / pi_old`` (old log-probs recomputed by the trainer under q);
- ``ppo_kl``: mean ``log pi_old - log pi_theta`` (KL(pi_old || pi_theta) estimate);
- ``clipfrac``: share of the kind's tokens whose loss term is clipped (PPO's bounds for on-policy
  and rephrased tokens, the replay ratio's for replayed ones; LUFFY's shaped term has no clip);
- ``entropy``: mean entropy of pi_theta at the kind's tokens;
- ``kl``: mean KL(pi_theta || pi_ref) estimate, when the loss has a reference policy;
- ``behaviour_ratio``: mean ``pi_old / pi_behaviour`` over the kind's tokens that have the
  sampling policy's log-probs (on-policy rollouts and replayed samples; never a rephrase, sampled
  under P(q, k), or an expert trace): the raw importance weight of decoupled PPO's behaviour
  correction, 1 up to the engine's numerical mismatch when nothing is stale;
- ``behaviour_kl``: mean ``log pi_behaviour - log pi_old`` over the same tokens, an estimate of
  KL(pi_behaviour || pi_old): how far the sampling policy has fallen behind the trained one.

Plain torch, no Megatron.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import Tensor

from .aggregation import masked_sum
from .masking import masked_log_ratio, per_token

PROVENANCES = ("onpolicy", "rephrased", "expert", "replay")

# Per-token metrics of compute_policy_loss that flag a clipped token (disjoint token sets:
# PPO's on on-policy tokens, the replay term's on replayed ones).
CLIP_INDICATORS = ("clipfrac_low", "clipfrac_high", "clipfrac_dual", "replay_clipfrac")

_TOKEN_MEANS = ("nll", "ratio", "ppo_kl", "clipfrac", "entropy", "kl")
_BEHAVIOUR_MEANS = ("behaviour_ratio", "behaviour_kl")


def provenance_codes(is_rephrased: Tensor, is_offpolicy: Tensor, is_replay: Tensor) -> Tensor:
    """``[batch]`` long: the index in :data:`PROVENANCES` of each sequence (replay wins over
    off-policy: a replayed sample is not a LUFFY trace)."""
    codes = torch.zeros(is_rephrased.shape, dtype=torch.long)
    codes[is_rephrased.bool()] = PROVENANCES.index("rephrased")
    codes[is_offpolicy.bool()] = PROVENANCES.index("expert")
    codes[is_replay.bool()] = PROVENANCES.index("replay")
    return codes


def provenance_sums(provenance: Tensor, response_mask: Tensor, logprobs: Tensor,
                    old_logprobs: Tensor, advantages: Tensor,
                    token_metrics: Mapping[str, Tensor],
                    behaviour_logprobs: Optional[Tensor] = None,
                    behaviour_mask: Optional[Tensor] = None,
                    log_ratio_clamp: Optional[float] = None) -> dict[str, Tensor]:
    """Additive per-provenance sums of one micro-batch (detached 0-dim tensors).

    ``provenance`` ``[batch]`` (codes of :func:`provenance_codes`), ``response_mask``,
    ``logprobs`` (current policy, under q), ``old_logprobs`` ``[batch, seq]``, ``advantages``
    ``[batch]`` or ``[batch, seq]``; ``token_metrics``: the loss's per-token metrics (clip
    indicators, ``entropy``, ``kl`` are used when present); ``behaviour_logprobs`` with
    ``behaviour_mask`` ``[batch, seq]`` (the tokens where they are the sampling policy's) add
    the behaviour statistics, their log-ratios clamped to ``log_ratio_clamp``. Returns
    ``{f"{kind}/{stat}_sum": value}`` for every kind of :data:`PROVENANCES` (zeros for kinds
    absent here, so every rank reports the same names) with ``stat`` in ``sequences``,
    ``tokens``, ``advantage``, ``behaviour_tokens`` (with behaviour log-probs) and those of
    :func:`finalize_provenance_metrics`.
    """
    with torch.no_grad():
        mask = response_mask.bool()
        logprobs, old_logprobs = logprobs.detach(), old_logprobs.detach()
        log_ratio = masked_log_ratio(logprobs, old_logprobs, mask)          # [batch, seq]
        advantages = per_token(advantages.detach(), logprobs)              # [batch, seq]
        lengths = mask.sum(dim=-1)                                          # [batch]
        seq_advantage = masked_sum(advantages, mask, dim=-1) / lengths.clamp(min=1)
        clipped = sum((token_metrics[k] for k in CLIP_INDICATORS if k in token_metrics),
                      torch.zeros_like(logprobs))
        per_token_values = {"nll": -logprobs, "ratio": torch.exp(log_ratio), "ppo_kl": -log_ratio,
                            "clipfrac": clipped}
        for name in ("entropy", "kl"):
            if name in token_metrics:
                per_token_values[name] = token_metrics[name].detach()
        behaviour_values = {}
        if behaviour_logprobs is not None and behaviour_mask is not None:
            behaviour_mask = behaviour_mask.bool() & mask
            behaviour_log_ratio = masked_log_ratio(old_logprobs, behaviour_logprobs.detach(),
                                                   behaviour_mask, log_ratio_clamp)
            behaviour_values = {"behaviour_ratio": torch.exp(behaviour_log_ratio),
                                "behaviour_kl": -behaviour_log_ratio}
        out = {}
        for code, kind in enumerate(PROVENANCES):
            rows = provenance.to(mask.device) == code                       # [batch]
            kind_mask = mask & rows[:, None]
            has_tokens = rows & (lengths > 0)
            out[f"{kind}/sequences_sum"] = has_tokens.sum().to(logprobs.dtype)
            out[f"{kind}/tokens_sum"] = kind_mask.sum().to(logprobs.dtype)
            out[f"{kind}/advantage_sum"] = torch.where(has_tokens, seq_advantage,
                                                       torch.zeros_like(seq_advantage)).sum()
            for name, values in per_token_values.items():
                out[f"{kind}/{name}_sum"] = masked_sum(values, kind_mask)
            if behaviour_values:
                kind_behaviour = kind_mask & behaviour_mask
                out[f"{kind}/behaviour_tokens_sum"] = kind_behaviour.sum().to(logprobs.dtype)
                for name, values in behaviour_values.items():
                    out[f"{kind}/{name}_sum"] = masked_sum(values, kind_behaviour)
        return out


def finalize_provenance_metrics(sums: Mapping[str, float], passes: int = 1) -> dict[str, float]:
    """Counts and means from the sums of :func:`provenance_sums` totalled over a step's
    micro-batches, DP ranks and ``passes`` optimizer passes over the same samples
    (``ppo_epochs``). Kinds with no sample are left out.

    Returns ``{f"{kind}/{stat}": value}``: ``sequences`` and ``tokens`` (per pass),
    ``advantage`` (per sequence), the per-token means ``nll``, ``ratio``, ``ppo_kl``,
    ``clipfrac``, ``entropy``, ``kl`` (the last two when present), and ``behaviour_ratio``,
    ``behaviour_kl`` over the kind's tokens with behaviour log-probs (when it has any).
    """
    out: dict[str, float] = {}
    for kind in PROVENANCES:
        sequences, tokens = sums.get(f"{kind}/sequences_sum", 0.0), sums.get(f"{kind}/tokens_sum", 0.0)
        if sequences <= 0 or tokens <= 0:
            continue
        out[f"{kind}/sequences"] = sequences / passes
        out[f"{kind}/tokens"] = tokens / passes
        out[f"{kind}/advantage"] = sums[f"{kind}/advantage_sum"] / sequences
        for name in _TOKEN_MEANS:
            key = f"{kind}/{name}_sum"
            if key in sums:
                out[f"{kind}/{name}"] = sums[key] / tokens
        behaviour_tokens = sums.get(f"{kind}/behaviour_tokens_sum", 0.0)
        if behaviour_tokens > 0:
            for name in _BEHAVIOUR_MEANS:
                out[f"{kind}/{name}"] = sums[f"{kind}/{name}_sum"] / behaviour_tokens
    return out


def is_provenance_sum(name: str) -> bool:
    """Whether a metric name is one of :func:`provenance_sums`' (to be finalised, not averaged)."""
    kind, _, stat = name.partition("/")
    return kind in PROVENANCES and stat.endswith("_sum")

