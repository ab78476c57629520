"""Forward passes of Megatron model chunks through Megatron's pipeline schedules.

Micro-batches are :class:`~.micro_batch.MicroBatch` es: a forward pass reads ``tokens``
[b, s] and, when present, ``position_ids`` and ``loss_mask`` (log-probs are then computed on
those positions only); each forward step moves its micro-batch to the rank's device. A packed
micro-batch runs as one row (:mod:`.packing`: THD under Transformer Engine, a block-diagonal
causal mask on the local spec) and its log-probs come back unpacked, ``[b, s]`` like any
other's. Every schedule (no pipelining, 1F1B, interleaved) is driven by
``megatron.core.pipeline_parallel.get_forward_backward_func``; results come back on the last
pipeline stage and are broadcast to the other stages when asked.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Iterable, Optional

import torch

from ..runtime import cpu_compat
from . import packing
from .logprobs import vocab_parallel_logprobs
from .micro_batch import ForwardOutput, MicroBatch


def causal_attention_mask(seq_len: int) -> torch.Tensor:
    """Megatron's boolean causal mask [1, 1, s, s] (True = masked). Passed explicitly: with
    ``attention_mask=None`` megatron-core builds its default mask on CUDA."""
    mask = torch.ones(seq_len, seq_len, dtype=torch.bool, device=cpu_compat.device())
    return torch.triu(mask, diagonal=1).view(1, 1, seq_len, seq_len)


def uses_thd(model) -> bool:
    """Whether a model chunk's attention takes packed rows as THD (Transformer Engine) rather
    than through a mask (the local spec)."""
    return model.config.transformer_impl == "transformer_engine"


def forward_inputs(host: MicroBatch, model) -> tuple[MicroBatch, dict,
                                                     Optional[packing.PackedLayout]]:
    """``host`` on this rank's device, ``GPTModel.forward``'s keyword inputs for it
    (``input_ids``, ``position_ids``, ``attention_mask``, ``packed_seq_params``), and its
    packed layout (None unpacked). A packed layout is computed from the host ``lengths``, so
    nothing waits on the device."""
    device = cpu_compat.device()
    batch = host.to(device)
    if host.pack_length is None:
        b, s = batch.shape
        pos = (torch.arange(s, device=device).expand(b, s) if batch.position_ids is None
               else batch.position_ids)
        return batch, dict(input_ids=batch.tokens, position_ids=pos,
                           attention_mask=causal_attention_mask(s)), None
    layout = packing.packed_layout(host.lengths, host.pack_length).to(device)
    inputs = dict(input_ids=packing.pack(batch.tokens, layout),
                  position_ids=packing.position_ids(layout))
    if uses_thd(model):
        inputs.update(attention_mask=None, packed_seq_params=packing.packed_seq_params(layout))
    else:
        inputs.update(attention_mask=packing.block_diagonal_causal_mask(layout))
    return batch, inputs, layout


def next_token_targets(tokens: torch.Tensor) -> torch.Tensor:
    """targets[:, t] = tokens[:, t + 1]; the last position repeats its own token (ignored)."""
    return torch.cat([tokens[:, 1:], tokens[:, -1:]], dim=1)


def next_token_logprobs(logits: torch.Tensor, batch: MicroBatch,
                        layout: Optional[packing.PackedLayout], temperature: float,
                        mask: Optional[torch.Tensor], vocab_size: Optional[int]
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs, entropy) ``[b, s]`` of each next token of ``batch`` (on the device of
    ``logits``, the chunk's output [rows, positions, v/tp]), computed on ``mask`` (None: every
    real position) and unpacked when the micro-batch ran packed."""
    targets = next_token_targets(batch.tokens)
    if layout is None:
        return vocab_parallel_logprobs(logits, targets, temperature, mask, vocab_size=vocab_size)
    real = torch.ones_like(targets, dtype=torch.bool) if mask is None else mask
    logp, entropy = vocab_parallel_logprobs(
        logits, packing.pack(targets, layout), temperature, packing.pack(real, layout),
        vocab_size=vocab_size)
    return (packing.unpack(logp, layout, batch.shape),
            packing.unpack(entropy, layout, batch.shape))


def needs_equal_shapes(model: list) -> bool:
    """Whether the micro-batches of one schedule run must share one shape (rows and length).

    With ``variable_seq_lengths`` megatron exchanges the activation and gradient shapes with
    four p2p ops posted in the same order on both ranks; under the interleaved schedule with
    PP=2 the previous and the next stage are the same rank, so the two shapes arrive swapped
    whenever they differ (then the data transfer fails)."""
    from megatron.core import parallel_state

    return len(model) > 1 and parallel_state.get_pipeline_model_parallel_world_size() == 2


def run_schedule(model: list, micro_batches: list[MicroBatch], forward_step_func: Callable,
                 forward_only: bool) -> list:
    """Run Megatron's schedule over ``micro_batches``; returns the loss function outputs
    collected on the last pipeline stage (empty elsewhere)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    mbs = max(mb.forward_shape[0] for mb in micro_batches)
    seq = max(mb.forward_shape[1] for mb in micro_batches)
    if needs_equal_shapes(model):
        micro_batches = [mb.fit_forward_shape(mbs, seq) for mb in micro_batches]
    iters: object = iter(micro_batches)
    if len(model) > 1:  # interleaved: each model chunk reads the same micro-batches
        iters = [iter(micro_batches) for _ in model]
    return get_forward_backward_func()(
        forward_step_func=forward_step_func, data_iterator=iters,
        model=model if len(model) > 1 else model[0], num_microbatches=len(micro_batches),
        seq_length=seq, micro_batch_size=mbs, forward_only=forward_only)


def _logprob_loss(batch: MicroBatch, layout: Optional[packing.PackedLayout],
                  temperature: float, vocab_size: Optional[int], logits: torch.Tensor):
    mask = batch.loss_mask
    logp, _ = next_token_logprobs(logits, batch, layout, temperature,
                                  None if mask is None else mask.bool(), vocab_size)
    return logits.new_zeros(()), ForwardOutput(logprobs=logp.detach())


def _logprob_forward_step(temperature: float, vocab_size: Optional[int], data_iterator, model):
    batch, inputs, layout = forward_inputs(next(data_iterator), model)
    return model(**inputs), partial(_logprob_loss, batch, layout, temperature, vocab_size)


def own_rows(outputs: list, micro_batches: list[MicroBatch]) -> list[torch.Tensor]:
    """The log-probs of each micro-batch's own rows and positions, from the loss function
    outputs of the last stage (a schedule that evens out shapes pads some)."""
    return [o.logprobs[:mb.num_sequences, :mb.seq_length]
            for o, mb in zip(outputs, micro_batches)]


def broadcast_from_last_stage(values: Optional[list[torch.Tensor]],
                              shapes: list[torch.Size]) -> list[torch.Tensor]:
    """Give every pipeline stage the tensors the last stage computed."""
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return values
    last = parallel_state.get_pipeline_model_parallel_last_rank()
    group = parallel_state.get_pipeline_model_parallel_group()
    out = []
    for i, shape in enumerate(shapes):
        t = values[i].contiguous() if values is not None else torch.empty(
            shape, dtype=torch.float32, device=cpu_compat.device())
        torch.distributed.broadcast(t, src=last, group=group)
        out.append(t)
    return out


@torch.no_grad()
def forward_logprobs(model: list, micro_batches: Iterable[MicroBatch],
                     temperature: float = 1.0, vocab_size: Optional[int] = None
                     ) -> list[torch.Tensor]:
    """Per-token log-probs of the next token, ``[b, s]`` per micro-batch (position t scores
    tokens[t + 1]; the last position is meaningless; 0 outside ``loss_mask`` when the
    micro-batch has one), available on every pipeline stage. ``vocab_size``: the real
    vocabulary (the padding past it gets no probability); None when the model has no padding."""
    from megatron.core import parallel_state

    micro_batches = list(micro_batches)
    for m in model:
        m.eval()
    out = run_schedule(model, micro_batches,
                       partial(_logprob_forward_step, temperature, vocab_size), forward_only=True)
    last = parallel_state.is_pipeline_last_stage()
    values = own_rows(out, micro_batches) if last else None
    return broadcast_from_last_stage(values, [mb.shape for mb in micro_batches])
