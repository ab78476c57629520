"""One optimizer step of the policy on Megatron-Core, and the forward-only log-prob passes.

:class:`PolicyTrainer` wraps this rank's model chunks in megatron ``DistributedDataParallel``,
builds megatron's optimizer (Adam, optional distributed optimizer, gradient clipping, fp32
main weights under bf16) and learning-rate schedule, and runs

    zero grads -> forward/backward over the micro-batches (loss.py: normalised so the result
    is the full-batch gradient in any layout) -> finalize_model_grads (DP reduction, tied
    embeddings under PP) -> finite check -> optimizer.step (clip, Adam) -> lr schedule

The finite check skips the update when the loss or any gradient is NaN or infinite:
megatron's optimizer applies such gradients in fp32 and bf16 (only fp16's loss scaler looks
for them), and clipping by a NaN norm leaves them as they are, so one NaN would reach every
weight.

:meth:`PolicyTrainer.compute_logprobs` gives the old log-probs of a batch before the update;
:func:`build_reference_model` loads a frozen second copy of the model for reference log-probs.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch

from ..algorithm import LossParams
from ..config.model import ModelConfig
from ..config.optimizer import OptimizerConfig
from ..config.parallel import ParallelConfig
from .forward import broadcast_from_last_stage, forward_logprobs, own_rows, run_schedule
from .loss import LossContext, global_normalisers, policy_forward_step
from .micro_batch import MicroBatch


@dataclass
class StepResult:
    """What one optimizer step reports, identical on every rank."""
    loss: float          # the full-batch loss (before the update)
    grad_norm: float     # global gradient norm before clipping
    lr: float            # learning rate used by this step
    update_successful: bool
    metrics: dict        # full-batch values of the loss library's metrics (clip fractions, ...)
    nonfinite: bool = False  # the loss or a gradient was NaN/inf: no update was made
    # micro-batches given without old log-probs: the log-probs [b, s] of this step's forward,
    # which served as the old ones (as compute_logprobs would have returned them)
    logprobs: Optional[list[torch.Tensor]] = None


def wrap_model(chunks: list, use_distributed_optimizer: bool) -> list:
    """Megatron DDP around each model chunk (with Float16Module first for bf16/fp16).

    Gradients are reduced in fp32, summed over DP after a 1/DP pre-scaling (loss.py's
    normalisation relies on this), once per step (no overlap: one reduction per step is what
    RL's few large steps need). A model built with FP8 weights (``TransformerConfig.fp8_param``,
    from ``model.fp8_param_gather``) gets ``fp8_param_gather``, as Megatron-LM's
    ``--fp8-param-gather`` sets both: the distributed optimizer then writes the updated main
    params into the FP8 weights and gathers them in FP8 (newer megatron-core does that only
    when the DDP config says so)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    config = chunks[0].config
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, average_in_collective=False,
        use_distributed_optimizer=use_distributed_optimizer,
        fp8_param_gather=bool(config.fp8_param))
    wrapped = []
    for i, chunk in enumerate(chunks):
        if config.bf16 or config.fp16:
            chunk = Float16Module(config, chunk)
        # As in Megatron-LM: only the first chunk's buffers are bucketed.
        ddp = DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk,
                                      disable_bucketing=i > 0)
        ddp.broadcast_params()  # DP replicas start identical whatever their RNG did
        wrapped.append(ddp)
    return wrapped


def build_optimizer(model: list, cfg: OptimizerConfig):
    """Megatron's Adam (decoupled weight decay) over the DDP-wrapped chunks."""
    from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
    from megatron.core.optimizer import get_megatron_optimizer

    config = model[0].config
    return get_megatron_optimizer(MegatronOptimizerConfig(
        optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad, use_distributed_optimizer=cfg.use_distributed_optimizer,
        bf16=config.bf16, fp16=config.fp16, params_dtype=config.params_dtype), model)


def build_lr_scheduler(optimizer, cfg: OptimizerConfig, total_steps: int):
    """Megatron's OptimizerParamScheduler, counted in optimizer steps."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=cfg.lr, min_lr=cfg.min_lr,
        lr_warmup_steps=cfg.lr_warmup_steps,
        lr_decay_steps=max(total_steps, cfg.lr_warmup_steps + 1),
        lr_decay_style=cfg.lr_decay_style, start_wd=cfg.weight_decay, end_wd=cfg.weight_decay,
        wd_incr_steps=max(total_steps, 1), wd_incr_style="constant")


def reduce_metrics(outputs: list[dict]) -> dict[str, float]:
    """Sum the per-micro-batch metrics of the loss function over micro-batches and DP ranks
    (they are additive by construction, see loss.py) and give them to every pipeline stage.
    Every micro-batch of a step must carry the same optional inputs (same metric names)."""
    from megatron.core import parallel_state

    last = parallel_state.is_pipeline_last_stage()
    names = [sorted(set().union(*outputs))] if last else [None]
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        torch.distributed.broadcast_object_list(
            names, src=parallel_state.get_pipeline_model_parallel_last_rank(),
            group=parallel_state.get_pipeline_model_parallel_group())
    names = names[0]
    values = None
    if last:
        values = torch.stack([sum(o[n].float() for o in outputs if n in o) for n in names])
        torch.distributed.all_reduce(values, group=parallel_state.get_data_parallel_group())
        values = [values]
    (values,) = broadcast_from_last_stage(values, [torch.Size([len(names)])])
    return dict(zip(names, values.tolist()))


class PolicyTrainer:
    """The policy's model chunks, optimizer and schedule; one :meth:`train_step` per update.

    ``chunks``: this rank's GPTModel chunks (``build_model``), already holding their weights.
    ``micro_batches`` passed to the methods are this rank's share of the global batch (its DP
    slice)."""

    def __init__(self, chunks: list, optimizer_cfg: OptimizerConfig, loss_params: LossParams,
                 total_steps: int, temperature: float = 1.0,
                 vocab_size: Optional[int] = None):
        from megatron.core.distributed import finalize_model_grads

        self.model = wrap_model(chunks, optimizer_cfg.use_distributed_optimizer)
        self.optimizer = build_optimizer(self.model, optimizer_cfg)
        self.scheduler = build_lr_scheduler(self.optimizer, optimizer_cfg, total_steps)
        self.loss_params, self.temperature = loss_params, temperature
        self.vocab_size = vocab_size  # the real vocabulary: logits past it are padding
        self.clip_grad = optimizer_cfg.clip_grad
        config = self.model[0].config
        config.finalize_model_grads_func = finalize_model_grads
        config.grad_scale_func = self.optimizer.scale_loss  # fp16 loss scaling; 1 otherwise
        self.loss_scaling = config.fp16  # fp16: megatron's scaler finds and skips inf gradients
        self.nonfinite_in_a_row = 0      # optimizer steps skipped in a row for NaN/inf

    def train_step(self, micro_batches: list[MicroBatch]) -> StepResult:
        """Forward/backward over ``micro_batches`` and one optimizer step.

        Micro-batches without ``old_logprobs`` (all of them or none) take the detached
        log-probs of this forward as the old ones: exact when this is the only optimizer step
        on the batch, and it saves :meth:`compute_logprobs`' forward. They come back in
        ``StepResult.logprobs``."""
        from megatron.core import parallel_state

        for chunk in self.model:
            chunk.train()
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        ctx = LossContext(self.loss_params, global_normalisers(micro_batches),
                          len(micro_batches), parallel_state.get_data_parallel_world_size(),
                          self.temperature, self.vocab_size)
        outputs = run_schedule(self.model, micro_batches, partial(policy_forward_step, ctx),
                               forward_only=False)
        logprobs = None
        if micro_batches[0].old_logprobs is None:
            last = parallel_state.is_pipeline_last_stage()
            logprobs = broadcast_from_last_stage(
                own_rows(outputs, micro_batches) if last else None,
                [mb.shape for mb in micro_batches])
        # identical on every rank, so is every branch below
        metrics = reduce_metrics([o.metrics for o in outputs])
        loss = metrics.pop("loss")
        lr = self.optimizer.param_groups[0]["lr"]
        finite = math.isfinite(loss) and (self.loss_scaling or self.gradients_finite())
        if not finite:
            self.nonfinite_in_a_row += 1
            return StepResult(loss=loss, grad_norm=math.nan, lr=lr, update_successful=False,
                              metrics=metrics, nonfinite=True, logprobs=logprobs)
        ok, grad_norm, _ = self.optimizer.step()
        if self.clip_grad == 0:  # megatron only measures the norm when it clips
            grad_norm = self.optimizer.get_grad_norm()
        if ok:
            self.scheduler.step(increment=1)
        grad_norm = float(grad_norm or 0.0)
        # A norm that overflowed although every gradient is finite clipped the update to zero.
        nonfinite = not math.isfinite(grad_norm)
        self.nonfinite_in_a_row = self.nonfinite_in_a_row + 1 if nonfinite else 0
        return StepResult(loss=loss, grad_norm=grad_norm, lr=lr, update_successful=bool(ok),
                          metrics=metrics, nonfinite=nonfinite, logprobs=logprobs)

    def gradients_finite(self) -> bool:
        """Whether every gradient of every rank is finite (collective over the world: a NaN
        on one rank would reach all of them through the DP reduction)."""
        return _all_ranks_finite(p.main_grad for chunk in self.model for p in chunk.parameters()
                                 if getattr(p, "main_grad", None) is not None)

    def parameters_finite(self) -> bool:
        """Whether every weight of every rank is finite (collective)."""
        return _all_ranks_finite(p.data for chunk in self.model for p in chunk.parameters())

    def compute_logprobs(self, micro_batches: list[MicroBatch]) -> list[torch.Tensor]:
        """Old log-probs ``[b, s]`` per micro-batch under the current weights (forward only)."""
        return forward_logprobs(self.model, micro_batches, self.temperature, self.vocab_size)


def _all_ranks_finite(tensors) -> bool:
    """All-reduced: no NaN or inf in ``tensors`` on any rank. One float64 sum per tensor (NaN
    and inf survive a sum; no tensor-sized temporary)."""
    from ..runtime.cpu_compat import device

    total = torch.zeros((), dtype=torch.float64, device=device())
    for t in tensors:
        total += t.sum(dtype=torch.float64)
    flag = torch.isfinite(total).to(torch.float32).reshape(1)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item() > 0)


def build_reference_model(arch, model_cfg: ModelConfig, parallel: ParallelConfig,
                          checkpoint: str, max_sequence_length: Optional[int] = None) -> list:
    """A frozen copy of the policy's initial weights (torch_dist ``checkpoint``, any layout)
    for reference log-probs: ``forward_logprobs(build_reference_model(...), micro_batches)``."""
    from ..checkpoint.model_io import load_model
    from ..models.builder import build_model

    if not os.path.isdir(checkpoint):
        raise FileNotFoundError(f"reference checkpoint {checkpoint!r} is not a directory")
    chunks = build_model(arch, model_cfg, parallel, max_sequence_length)
    load_model(chunks, checkpoint)
    for chunk in chunks:
        chunk.requires_grad_(False)
        chunk.eval()
    return chunks
