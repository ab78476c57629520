"""The loss of one micro-batch: what the trainer calls, composed from the pieces of this package.

Every response token belongs to exactly one policy term:

- on-policy tokens: the registered policy loss (``params.policy_loss``, e.g. ``ppo_clip``)
  on ``pi_theta / pi_old``; RePO's rephrased trace is on-policy here (its old log-probs are
  recomputed under the original prompt);
- ``is_offpolicy`` tokens: LUFFY's shaped ``-A f(p)``, no old log-prob, no clip;
- ``is_replay`` tokens: Replay-Enhanced PO's clipped ``pi_theta / pi_behaviour`` term,
  times ``params.replay_coef``;

and every response token also gets ``beta * KL(pi_theta || pi_ref)`` (when ``ref_logprobs``
are given) and ``-entropy_coef * H`` (when ``entropy`` is given). The sum is aggregated once,
by ``params.loss_agg_mode`` with the global normalisers (see ``aggregation.py``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .aggregation import LossNormalisers, aggregate_loss, token_mean
from .entropy import entropy_bonus
from .kl import kl_penalty
from .luffy import luffy_policy_loss
from .masking import per_token, token_mask
from .params import LossParams
from .provenance import provenance_sums
from .registry import get_policy_loss
from .replay import replay_policy_loss


def compute_policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor,
                        response_mask: Tensor, *, params: LossParams = LossParams(),
                        normalisers: Optional[LossNormalisers] = None,
                        ref_logprobs: Optional[Tensor] = None, entropy: Optional[Tensor] = None,
                        is_offpolicy: Optional[Tensor] = None,
                        behaviour_logprobs: Optional[Tensor] = None,
                        is_replay: Optional[Tensor] = None,
                        provenance: Optional[Tensor] = None,
                        sampled_onpolicy: Optional[Tensor] = None
                        ) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss and metrics of one micro-batch.

    Inputs (``[batch, seq]`` unless noted; masked positions may hold any finite value):
      logprobs            log pi_theta of each response token (carries the gradient)
      old_logprobs        log pi_old, recomputed by the trainer before the update
      advantages          per token, or ``[batch]`` per sequence
      response_mask       1 on response tokens, 0 on prompt and padding
      params              :class:`LossParams` (clip range, beta, aggregation mode, ...)
      normalisers         global token/sequence counts (summed over micro-batches and
                          all-reduced over DP); None when this call sees the whole batch
      ref_logprobs        log pi_ref, for the KL term
      entropy             per-token entropy of pi_theta, for the entropy bonus
      is_offpolicy        ``[batch]`` or ``[batch, seq]``: LUFFY expert tokens
      behaviour_logprobs  log pi_behaviour of replayed tokens (required with ``is_replay``)
      is_replay           ``[batch]`` or ``[batch, seq]``: Replay-Enhanced PO buffer tokens
      provenance          ``[batch]`` codes of ``provenance.PROVENANCES`` (on-policy, rephrased,
                          expert, replay): adds the per-provenance sums of
                          :func:`~.provenance.provenance_sums` to the metrics
      sampled_onpolicy    ``[batch]``: rows whose ``behaviour_logprobs`` are the sampling
                          policy's (with the replayed ones: the per-provenance behaviour
                          statistics, with ``provenance``)

    Output: ``(loss, metrics)``. ``loss`` is a scalar to back-propagate. Summed over the
    micro-batches and DP ranks of a global batch (all called with the same global
    ``normalisers``), both ``loss`` and every entry of ``metrics`` equal their value on the
    whole batch: ``loss`` and ``pg_loss`` by ``params.loss_agg_mode``, the others as sums over
    response tokens divided by the global token count. Metrics are detached scalars:
    ``pg_loss``, ``clipfrac_low``/``_high``/``_dual``, ``ppo_kl`` (and those of the registered
    policy loss), ``kl`` / ``entropy`` when given, ``offpolicy_*`` / ``replay_*`` when those
    masks are given, and ``<kind>/<stat>_sum`` with ``provenance``.
    """
    mask = response_mask.bool()
    normalisers = normalisers or LossNormalisers.from_mask(mask)
    advantages = per_token(advantages, logprobs)                            # [batch, seq]
    offpolicy = token_mask(is_offpolicy, mask)
    replay = token_mask(is_replay, mask)
    if bool((offpolicy & replay).any()):
        raise ValueError("a token is marked both is_offpolicy (LUFFY) and is_replay")
    onpolicy = mask & ~offpolicy & ~replay

    policy_loss = get_policy_loss(params.policy_loss)
    pg_token_loss, token_metrics = policy_loss(logprobs, old_logprobs, advantages, onpolicy, params)
    if is_offpolicy is not None:
        luffy_loss, luffy_metrics = luffy_policy_loss(logprobs, advantages, offpolicy,
                                                      params.luffy_shaping_gamma)
        pg_token_loss = pg_token_loss + luffy_loss
        token_metrics.update(luffy_metrics)
    if is_replay is not None:
        if behaviour_logprobs is None:
            raise ValueError("is_replay needs behaviour_logprobs (log-probs of the policy "
                             "that sampled the replayed responses)")
        replay_loss, replay_metrics = replay_policy_loss(logprobs, behaviour_logprobs,
                                                         advantages, replay,
                                                         params.replay_clip, params.replay_coef,
                                                         params.log_ratio_clamp)
        pg_token_loss = pg_token_loss + replay_loss
        token_metrics.update(replay_metrics)

    token_loss = pg_token_loss
    if ref_logprobs is not None:
        kl = kl_penalty(logprobs, ref_logprobs, mask, params.kl_estimator,
                        params.log_ratio_clamp, params.kl_k3_clamp)
        token_loss = token_loss + params.kl_coef * kl
        token_metrics["kl"] = kl
    if entropy is not None:
        token_loss = token_loss + entropy_bonus(entropy, mask, params.entropy_coef)
        token_metrics["entropy"] = entropy

    def aggregate(values: Tensor) -> Tensor:
        return aggregate_loss(values, mask, params.loss_agg_mode, normalisers,
                              params.loss_norm_length)

    loss = aggregate(token_loss)
    with torch.no_grad():
        metrics = {"pg_loss": aggregate(pg_token_loss)}
        metrics.update({name: token_mean(value, mask, normalisers)
                        for name, value in token_metrics.items()})
    if provenance is not None:
        behaviour_mask = None
        if behaviour_logprobs is not None and sampled_onpolicy is not None:
            behaviour_mask = token_mask(sampled_onpolicy, mask) | replay
        metrics.update(provenance_sums(provenance, mask, logprobs, old_logprobs, advantages,
                                       token_metrics, behaviour_logprobs, behaviour_mask,
                                       params.log_ratio_clamp))
    return loss, metrics
