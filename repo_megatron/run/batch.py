"""From rollout groups to the trainer's micro-batches (plain torch, no Megatron).

Every rank builds the same global batch from the same groups, plans which sequences each
data-parallel rank runs in which micro-batch (:mod:`.batching`: a fixed count, or a token
budget balanced over the ranks) and builds its own micro-batches
(:class:`~repo_megatron.trainer.micro_batch.MicroBatch`). A sequence is ``prompt_ids +
response_ids`` of its ORIGINAL prompt ``q`` (a rephrased trace too); position ``t`` scores
``tokens[t + 1]``, so response token ``j`` of a prompt of length ``P`` is scored at position
``P - 1 + j``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch

from ..algorithm import compute_advantages
from ..algorithm.provenance import provenance_codes
from ..rollout.staleness import staleness
from ..rollout.types import Group, Sample
from ..trainer.micro_batch import MicroBatch
from .batching import PlannedMicroBatch, row_length


def group_advantages(groups: Sequence[Group], estimator: str, eps: float) -> list[list[float]]:
    """Advantages of every sample of every group (``estimator`` from the registry).

    Replayed samples are normalised apart from the fresh ones (Replay-Enhanced PO); a LUFFY
    expert trace or a RePO rephrase is part of its group like any rollout."""
    rewards = torch.tensor([s.reward for g in groups for s in g.samples], dtype=torch.float64)
    ids = torch.tensor([i for i, g in enumerate(groups) for _ in g.samples])
    replay = torch.tensor([s.is_replay for g in groups for s in g.samples])
    adv = compute_advantages(rewards, ids, estimator=estimator, eps=eps,
                             is_offpolicy=replay if bool(replay.any()) else None).tolist()
    out, k = [], 0
    for g in groups:
        out.append(adv[k:k + len(g.samples)])
        k += len(g.samples)
    return out


def build_global_batch(groups: Sequence[Group], advantages: Sequence[Sequence[float]],
                       pad_id: int, policy_version: Optional[int] = None) -> MicroBatch:
    """The step's ``N`` sequences as one batch, right-padded to the longest: ``tokens``,
    ``loss_mask``, ``behaviour_logprobs`` ``[N, S]``, per-sequence ``advantages``,
    ``provenance`` codes, ``lengths`` and ``sampled_onpolicy`` ``[N]``, and the flags of the
    loss terms the step needs: ``is_offpolicy`` when it holds a LUFFY expert trace,
    ``is_replay`` when it holds a replayed sample (None otherwise). With the trainer's
    ``policy_version``, ``staleness`` ``[N]``: the weight versions each sample is behind it
    (:func:`repo_megatron.rollout.staleness.staleness`; 0 for a sample without a version).

    ``behaviour_logprobs`` holds the sampling policy's log-probs where they are valid:
    on-policy rollouts and replayed samples. Rephrased traces were sampled under another prompt
    and LUFFY's expert trace was not sampled at all: zeros, outside ``sampled_onpolicy`` and
    ``is_replay``, so nothing can use them as old log-probs."""
    samples: list[Sample] = [s for g in groups for s in g.samples]
    flat_adv = [a for adv in advantages for a in adv]
    if len(flat_adv) != len(samples):
        raise ValueError(f"{len(flat_adv)} advantages for {len(samples)} samples")
    length = max(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    n = len(samples)
    tokens = torch.full((n, length), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(n, length)
    behaviour = torch.zeros(n, length)
    for i, s in enumerate(samples):
        p, r = len(s.prompt_ids), len(s.response_ids)
        tokens[i, :p + r] = torch.tensor(list(s.prompt_ids) + list(s.response_ids))
        loss_mask[i, p - 1:p - 1 + r] = torch.tensor(s.loss_mask, dtype=torch.float32)
        if s.logprobs_valid:
            behaviour[i, p - 1:p - 1 + r] = torch.tensor(s.behaviour_logprobs)
    is_offpolicy = torch.tensor([s.is_offpolicy and not s.is_replay for s in samples])
    is_replay = torch.tensor([s.is_replay for s in samples])
    is_rephrased = torch.tensor([s.is_rephrased for s in samples])
    has_behaviour = torch.tensor([s.logprobs_valid for s in samples])
    lags = None
    if policy_version is not None:
        lags = torch.tensor([staleness(s, policy_version) or 0 for s in samples])
    return MicroBatch(
        tokens=tokens, loss_mask=loss_mask, behaviour_logprobs=behaviour,
        advantages=torch.tensor(flat_adv, dtype=torch.float32),
        is_offpolicy=is_offpolicy if bool(is_offpolicy.any()) else None,
        is_replay=is_replay if bool(is_replay.any()) else None,
        provenance=provenance_codes(is_rephrased=is_rephrased, is_offpolicy=is_offpolicy,
                                    is_replay=is_replay),
        lengths=torch.tensor([len(s.prompt_ids) + len(s.response_ids) for s in samples]),
        sampled_onpolicy=has_behaviour & ~is_replay & ~is_rephrased, staleness=lags)


def micro_batches(batch: MicroBatch, planned: Sequence[PlannedMicroBatch]) -> list[MicroBatch]:
    """This rank's micro-batches of ``batch`` as its plan says (:mod:`.batching`): each holds
    its sequences, padding rows (masked, counting nowhere in the loss) up to its rows, and is
    cut or right-padded to its length with masked zeros (see
    :meth:`~repo_megatron.trainer.micro_batch.MicroBatch.fit_length`). A packed one keeps
    its sequences as rows (the loss's layout) trimmed to the longest, and runs them as one row
    of ``pack_length`` positions (:mod:`repo_megatron.trainer.packing`)."""
    out = []
    for p in planned:
        mb = batch.select(torch.tensor(p.sequences, dtype=torch.long))
        # a packed micro-batch with no sequence keeps one padding row: no empty tensors
        mb = mb.pad_rows((1 if p.packed else p.rows) - mb.num_sequences)
        if p.packed:
            own = mb.lengths.tolist()
            mb = dataclasses.replace(mb.fit_length(row_length(own, 1, False)),
                                     pack_length=p.length)
        else:
            mb = mb.fit_length(p.length)
        out.append(mb)
    return out


def mismatch_metrics(old_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor,
                     loss_mask: torch.Tensor, onpolicy: torch.Tensor) -> torch.Tensor:
    """Train/rollout log-prob mismatch over on-policy samples with valid behaviour log-probs
    (never rephrased, expert or replayed ones): ``[sum, max, tokens]`` of ``|old -
    behaviour|``, float64 on ``old_logprobs``' device (the host-built inputs are moved there),
    for the caller to add up over micro-batches and reduce across ranks without a host sync."""
    dev = old_logprobs.device
    mask = loss_mask.to(dev).bool() & onpolicy.to(dev)[:, None]
    diff = torch.where(mask, (old_logprobs - behaviour_logprobs.to(dev)).abs(), 0.0).double()
    return torch.stack([diff.sum(), diff.max(), mask.sum().double()])


def truncated_importance_weights(old_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor,
                                 loss_mask: torch.Tensor, onpolicy: torch.Tensor,
                                 cap: Optional[float]) -> torch.Tensor:
    """Per-token ``min(pi_old / pi_behaviour, cap)`` on on-policy tokens (1 elsewhere), on
    ``old_logprobs``' device: the truncated importance sampling correction of the rollout
    engine's sampling mismatch. PPO's clipped objective is linear in a positive per-token
    weight, so it is applied by scaling the advantages."""
    weights = torch.ones_like(old_logprobs)
    if cap is None:
        return weights
    dev = old_logprobs.device
    mask = loss_mask.to(dev).bool() & onpolicy.to(dev)[:, None]
    ratio = torch.exp(old_logprobs - behaviour_logprobs.to(dev)).clamp(max=cap)
    return torch.where(mask, ratio, weights)


def stale_rows(batch: MicroBatch) -> torch.Tensor:
    """``[b]`` bool: on-policy rollouts generated by an older weight version than the one
    trained (the rows the staleness correction weights)."""
    if batch.staleness is None:
        return torch.zeros_like(batch.sampled_onpolicy)
    return batch.sampled_onpolicy & (batch.staleness > 0)


def behaviour_cap(tis_cap: Optional[float], stale_tis_cap: Optional[float],
                  stale: bool) -> Optional[float]:
    """The cap of the behaviour weight min(pi_old / pi_behaviour, cap) of an on-policy row:
    ``stale_tis_cap`` for a stale one (``tis_cap`` when that is null), ``tis_cap`` otherwise."""
    return (tis_cap if stale_tis_cap is None else stale_tis_cap) if stale else tis_cap


def behaviour_weights(old_logprobs: torch.Tensor, batch: MicroBatch, tis_cap: Optional[float],
                      stale_tis_cap: Optional[float]) -> Optional[torch.Tensor]:
    """Per-token weights of decoupled PPO's behaviour correction (docs/algorithm.md):
    ``min(pi_old / pi_behaviour, c)`` on the on-policy rollouts, ``c`` by
    :func:`behaviour_cap` (stale rows and current ones apart), 1 elsewhere; None when no row
    has a cap (the weights would all be 1). ``old_logprobs`` is pi_old (the proximal policy)
    of ``batch``."""
    stale = stale_rows(batch)
    fresh_cap, old_cap = (behaviour_cap(tis_cap, stale_tis_cap, s) for s in (False, True))
    if fresh_cap is None and (old_cap is None or not bool(stale.any())):
        return None
    weights = truncated_importance_weights(old_logprobs, batch.behaviour_logprobs,
                                           batch.loss_mask, batch.sampled_onpolicy & ~stale,
                                           fresh_cap)
    if bool(stale.any()):
        weights = weights * truncated_importance_weights(
            old_logprobs, batch.behaviour_logprobs, batch.loss_mask, stale, old_cap)
    return weights
