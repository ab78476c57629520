"""Vocab-parallel per-token log-probs and entropy from tensor-parallel-sharded logits.

Each TP rank holds the logits of its slice of the vocabulary, ``[b, s, v/tp]``; the full
vocabulary is never gathered. Tokens are processed in chunks, so the extra memory is a few
``[chunk, v/tp]`` fp32 buffers whatever the sequence length, in the backward pass too.

Forward, per chunk of tokens (``z = logits / temperature`` in fp32):

- megatron's :class:`VocabParallelCrossEntropy` stages (the arithmetic of
  ``tensor_parallel.vocab_parallel_cross_entropy``, not the fused variant whose gradient is
  cast to bf16): ``m = max z`` all-reduced (MAX) over TP, ``e = exp(z - m)``,
  ``S = sum e``, the target's ``z_t - m``;
- one all-reduce (SUM) over TP of ``[z_t - m, S, T]`` with ``T = sum e (z - m)``;
- ``log p_t = (z_t - m) - log S`` and ``H = log S - T / S``.

Only the per-token ``m``, ``log S`` and ``H`` are kept. The backward pass recomputes each
chunk's softmax ``p = exp(z - m - log S)`` (no communication: ``m`` and ``S`` are already
global) and applies

    d/dz_v = g_logp (1[v = t] - p_v) - g_H p_v (log p_v + H)

the first term with megatron's own cross-entropy gradient stage. The upstream gradients are
identical on every TP rank (the loss is replicated across TP), so each rank's local slice of
the gradient is exact without any further reduction.
"""

from __future__ import annotations

from typing import Optional

import torch

# fp32 bytes of one [chunk, v/tp] buffer; forward and backward hold about three of them.
DEFAULT_CHUNK_BYTES = 16 * 2**20


def tokens_per_chunk(vocab_partition: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """How many tokens fit in ``chunk_bytes`` of fp32 logits over ``vocab_partition`` entries."""
    return max(1, chunk_bytes // (4 * vocab_partition))


def _tp_group_info() -> tuple[object, int, int]:
    from megatron.core import parallel_state

    return (parallel_state.get_tensor_model_parallel_group(),
            parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_world_size())


# Logit given to vocabulary padding: exp() of it is exactly 0, and 0 * it stays finite.
PADDING_LOGIT = -1e30


def _scaled_chunk(logits: torch.Tensor, rows: torch.Tensor, temperature: float,
                  valid: int) -> torch.Tensor:
    """fp32 ``logits[rows] / temperature`` as a fresh tensor (megatron's stages work in place),
    with the local columns from ``valid`` on (vocabulary padding) set to :data:`PADDING_LOGIT`:
    padding rows of the output layer are not tokens and must not take probability mass."""
    z = logits.index_select(0, rows).float()                                 # [c, v/tp]
    if temperature != 1.0:
        z.div_(temperature)
    if valid < z.size(-1):
        z[:, valid:] = PADDING_LOGIT
    return z


def _local_targets(targets: torch.Tensor, vocab_start: int, vocab_end: int):
    """(mask of targets owned by another rank, target index into the local slice)."""
    other = (targets < vocab_start) | (targets >= vocab_end)
    local = (targets - vocab_start).masked_fill(other, 0)
    return other, local


def _chunk_forward(z: torch.Tensor, targets: torch.Tensor, group, tp_rank: int, tp_size: int):
    """(log p of the targets, entropy, max logit m, log S) of one chunk, each [c];
    overwrites ``z``."""
    from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy as VPCE
    from megatron.core.tensor_parallel.utils import VocabUtility

    start, end = VocabUtility.vocab_range_from_per_partition_vocab_size(
        z.size(-1), tp_rank, tp_size)
    exp_z, z_max = VPCE.calculate_logits_max(z.clone())  # z itself is kept for T
    if tp_size > 1:
        torch.distributed.all_reduce(z_max, op=torch.distributed.ReduceOp.MAX, group=group)
    _, _, target_z, sum_exp, exp_z = VPCE.calculate_predicted_logits(
        exp_z, targets, z_max, start, end)                                   # exp_z: [c, v/tp]
    # T = sum e (z - m): shifting first keeps H = log S - T / S free of cancellation.
    t_sum = z.sub_(z_max[:, None]).mul_(exp_z).sum(dim=-1)
    stats = torch.stack([target_z, sum_exp, t_sum])                         # [3, c]
    if tp_size > 1:
        torch.distributed.all_reduce(stats, group=group)
    target_z, sum_exp, t_sum = stats
    log_sum_exp = sum_exp.log()
    return target_z - log_sum_exp, log_sum_exp - t_sum / sum_exp, z_max, log_sum_exp


def _chunk_grad(z: torch.Tensor, targets: torch.Tensor, z_max: torch.Tensor,
                log_sum_exp: torch.Tensor, entropy: torch.Tensor,
                grad_logp: Optional[torch.Tensor], grad_entropy: Optional[torch.Tensor],
                tp_rank: int, tp_size: int) -> torch.Tensor:
    """d(loss)/dz of one chunk [c, v/tp]; overwrites ``z``."""
    from megatron.core.tensor_parallel.cross_entropy import VocabParallelCrossEntropy as VPCE
    from megatron.core.tensor_parallel.utils import VocabUtility

    start, end = VocabUtility.vocab_range_from_per_partition_vocab_size(
        z.size(-1), tp_rank, tp_size)
    # m and log S are applied one after the other: their fp32 sum would lose digits.
    z_shifted = z.sub_(z_max[:, None])                                       # [c, v/tp]
    probs = torch.exp(z_shifted - log_sum_exp[:, None])
    grad = None
    if grad_entropy is not None:
        # -g_H p (log p + H), built in z's storage
        grad = z_shifted.sub_((log_sum_exp - entropy)[:, None]).mul_(probs).mul_(
            -grad_entropy[:, None])
    if grad_logp is not None:
        other, local = _local_targets(targets, start, end)
        # megatron's cross-entropy backward: (p - 1[v = t]) * d(-log p_t), in place on probs
        grad_2d, arange, update, grad_in = VPCE.prepare_gradient_calculation_operands(probs, other)
        grad_logp_term = VPCE.calculate_gradients(grad_2d, arange, local, update, grad_in,
                                                  -grad_logp)
        grad = grad_logp_term if grad is None else grad.add_(grad_logp_term)
    return grad


class _VocabParallelLogProbs(torch.autograd.Function):
    """Chunked log-probs and entropy of ``rows`` of ``logits`` [n, v/tp]; outputs [n] with
    zeros on the other rows. The backward recomputes each chunk instead of storing it."""

    @staticmethod
    def forward(ctx, logits, targets, rows, temperature, chunk, vocab_size):
        group, tp_rank, tp_size = _tp_group_info()
        v_local = logits.size(-1)
        valid = v_local if vocab_size is None else \
            min(max(vocab_size - tp_rank * v_local, 0), v_local)  # real tokens of this slice
        logp = logits.new_zeros(logits.size(0), dtype=torch.float32)         # [n]
        entropy = torch.zeros_like(logp)
        z_max, log_sum_exp = torch.zeros_like(logp), torch.zeros_like(logp)
        with torch.no_grad():
            for rows_c in rows.split(chunk):
                z = _scaled_chunk(logits, rows_c, temperature, valid)
                logp[rows_c], entropy[rows_c], z_max[rows_c], log_sum_exp[rows_c] = \
                    _chunk_forward(z, targets[rows_c], group, tp_rank, tp_size)
        ctx.save_for_backward(logits, targets, rows, z_max, log_sum_exp, entropy)
        ctx.temperature, ctx.chunk, ctx.tp, ctx.valid = temperature, chunk, (tp_rank, tp_size), valid
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        logits, targets, rows, z_max, log_sum_exp, entropy = ctx.saved_tensors
        grad = torch.zeros_like(logits)                                      # [n, v/tp]
        if grad_logp is None and grad_entropy is None:
            return grad, None, None, None, None, None
        for rows_c in rows.split(ctx.chunk):
            z = _scaled_chunk(logits, rows_c, ctx.temperature, ctx.valid)
            grad_c = _chunk_grad(
                z, targets[rows_c], z_max[rows_c], log_sum_exp[rows_c], entropy[rows_c],
                None if grad_logp is None else grad_logp[rows_c].float(),
                None if grad_entropy is None else grad_entropy[rows_c].float(), *ctx.tp)
            if ctx.temperature != 1.0:
                grad_c.div_(ctx.temperature)
            grad.index_copy_(0, rows_c, grad_c.to(grad.dtype))
        return grad, None, None, None, None, None


def vocab_parallel_logprobs(logits: torch.Tensor, targets: torch.Tensor,
                            temperature: float = 1.0, mask: Optional[torch.Tensor] = None,
                            chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                            vocab_size: Optional[int] = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of ``targets`` and entropies of the next-token distributions, differentiable.

    Inputs: ``logits`` [b, s, v/tp] (this TP rank's vocabulary slice, any float dtype; the
    maths runs in fp32), ``targets`` [b, s] global token ids, ``mask`` [b, s] (only these
    positions are computed; None = all), ``vocab_size`` the real vocabulary (columns past it
    are Megatron's padding and get no probability; None = no padding). Outputs: ``(logprobs, entropy)``, fp32 [b, s],
    identical on every TP rank, 0 outside ``mask``.
    """
    b, s, v_local = logits.shape
    flat_targets = targets.reshape(-1)
    rows = (torch.arange(b * s, device=logits.device) if mask is None
            else mask.reshape(-1).nonzero().squeeze(1))
    logp, entropy = _VocabParallelLogProbs.apply(
        logits.reshape(b * s, v_local), flat_targets, rows, float(temperature),
        tokens_per_chunk(v_local, chunk_bytes), vocab_size)
    return logp.view(b, s), entropy.view(b, s)
