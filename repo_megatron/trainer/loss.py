"""The GRPO/RePO loss as a forward step for Megatron's pipeline schedules, exact in any layout.

A training step cuts its global batch into micro-batches (``M_r`` on data-parallel rank ``r``
of ``DP``; any sizes: a fixed count of sequences, or a token budget, packed or not, see
:mod:`repo_megatron.run.batching`) and runs them through ``get_forward_backward_func`` (no
pipelining, 1F1B or interleaved). The maths of each micro-batch is
:func:`repo_megatron.algorithm.compute_policy_loss`.

Normalisation (why the loss and its gradients do not depend on the layout):

1. Before the schedule, :func:`global_normalisers` adds the response-token and sequence
   counts of every micro-batch of this rank and all-reduces them (SUM) over the DP group.
2. Each micro-batch's loss ``l_k`` is aggregated with those *global* counts, so that
   ``sum over all micro-batches of all DP ranks of l_k`` is exactly the loss of the whole
   global batch, for every ``loss_agg_mode`` (the algorithm library's contract).
3. Megatron then applies two scalings that we undo exactly, by returning
   ``l_k * M_r * DP`` from the loss function (the 2-value convention), ``M_r`` being the
   number of micro-batches *this* rank passes to the schedule:
   ``forward_step_calc_loss`` divides a 2-value loss by its ``num_microbatches`` (= ``M_r``),
   so rank ``r`` accumulates ``DP * sum_{k on r} d l_k / d theta``; and
   ``DistributedDataParallel`` (``calculate_per_token_loss=False``,
   ``average_in_collective=False``) multiplies every gradient by ``gradient_scaling_factor =
   1/DP`` before the SUM all-reduce. The resulting gradient is ``sum_r sum_{k on r} d l_k /
   d theta``: the gradient of the full-batch loss, as one process computing it at once would
   get, whatever the sizes of the micro-batches and however many each rank holds (the batch
   planner gives every rank the same count for Megatron's sake, not the loss's). With ``M_r``
   and ``DP`` powers of two the scalings are exact in floating point; otherwise ``(x * M_r) /
   M_r`` is ``x`` within one rounding (``2^-24`` relative in fp32), which the batching
   parity tests bound (tests/trainer/test_token_budget_parity.py).

Megatron's alternative, ``calculate_per_token_loss=True`` with a 3-value loss function, divides
the gradients by the all-reduced token count in ``finalize_model_grads``; it only expresses
``token-mean``, not the sequence-mean modes, so it is not used.

The reported loss and metrics are the unscaled ``l_k`` (and the library's metrics, also
additive), summed over micro-batches and DP ranks by :func:`reduce_metrics` in
:mod:`repo_megatron.trainer.train_step`.

What a micro-batch carries, and so which terms its loss has, is defined once, by
:class:`~.micro_batch.MicroBatch`. Without ``old_logprobs`` (a batch that gets exactly one
optimizer step) pi_old is the policy of this very forward: its detached log-probs serve (the
ratio is exactly 1) and come back in :class:`~.micro_batch.ForwardOutput`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Iterable, Optional

import torch

from ..algorithm import LossNormalisers, LossParams, compute_policy_loss
from ..runtime import cpu_compat
from .forward import forward_inputs, next_token_logprobs
from .micro_batch import ForwardOutput, MicroBatch
from .packing import PackedLayout


@dataclass(frozen=True)
class LossContext:
    """What every micro-batch's loss needs to know about the whole step."""
    params: LossParams
    normalisers: LossNormalisers  # global counts: all micro-batches of all DP ranks
    num_microbatches: int         # micro-batches of this rank in this step (M_r)
    data_parallel_size: int       # DP
    temperature: float = 1.0
    vocab_size: Optional[int] = None  # real vocabulary; Megatron's padding past it is masked

    @property
    def megatron_scale(self) -> int:
        """Undoes the schedule's 1/M_r and DDP's 1/DP (module docstring)."""
        return self.num_microbatches * self.data_parallel_size


def global_normalisers(micro_batches: Iterable[MicroBatch]) -> LossNormalisers:
    """Response-token and sequence counts of this rank's micro-batches, summed over the DP
    group: the denominators of the global batch's loss."""
    from megatron.core import parallel_state

    local = [LossNormalisers.from_mask(mb.loss_mask) for mb in micro_batches]
    counts = torch.tensor([[float(n.num_tokens), float(n.num_sequences)] for n in local],
                          dtype=torch.float64, device=cpu_compat.device()).sum(dim=0)  # [2]
    torch.distributed.all_reduce(counts, group=parallel_state.get_data_parallel_group())
    return LossNormalisers(num_tokens=int(counts[0]), num_sequences=int(counts[1]))


def policy_loss_func(batch: MicroBatch, layout: Optional[PackedLayout], ctx: LossContext,
                     logits: torch.Tensor):
    """Megatron loss function of one micro-batch (last pipeline stage; ``batch`` on the
    device of ``logits`` [rows, positions, v/tp]; ``layout`` when it ran packed). Returns
    ``(l_k * M * DP, ForwardOutput)``: the unscaled ``loss`` and the library's metrics,
    detached, and, without ``old_logprobs``, the log-probs [b, s] that served as the old
    ones."""
    mask = batch.loss_mask.bool()
    logp, entropy = next_token_logprobs(logits, batch, layout, ctx.temperature, mask,
                                        ctx.vocab_size)
    if ctx.params.entropy_coef == 0:
        entropy = entropy.detach()  # a metric only: no backward through it
    old = batch.old_logprobs
    loss, metrics = compute_policy_loss(
        logp, logp.detach() if old is None else old, batch.advantages, mask,
        params=ctx.params, normalisers=ctx.normalisers, entropy=entropy,
        ref_logprobs=batch.ref_logprobs, is_offpolicy=batch.is_offpolicy,
        is_replay=batch.is_replay, behaviour_logprobs=batch.behaviour_logprobs,
        provenance=batch.provenance, sampled_onpolicy=batch.sampled_onpolicy)
    return loss * ctx.megatron_scale, ForwardOutput(
        {"loss": loss.detach(), **metrics},
        logprobs=logp.detach() if old is None else None)  # the old ones: handed back


def policy_forward_step(ctx: LossContext, data_iterator, model):
    """Megatron forward step: run the model chunk on the next micro-batch (moved to this
    rank's device)."""
    batch, inputs, layout = forward_inputs(next(data_iterator), model)
    return model(**inputs), partial(policy_loss_func, batch, layout, ctx)
