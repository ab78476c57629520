"""Per-GPU memory of a config measured on the real shapes: ``repo-megatron plan --measure``.

For each pipeline position the plan reports (the first stage: the most activations in flight;
the last: the logits and the loss), :func:`measure_stage` builds that rank of the real world
size (TP 0, DP 0 of TP x PP x DP, :mod:`.fake_world`) at full size on the ``meta`` device
(:func:`~repo_megatron.runtime.cpu_compat.cuda_redirected_to`): the model chunks
(:mod:`.gpu_layers`), the trainer's Megatron DDP and optimizer (``PolicyTrainer``: fp32 gradient
buffers, the distributed optimizer's fp32 main parameters and Adam states), and runs

    two training steps: Megatron's pipeline schedule (``trainer.forward.run_schedule``) over
    full-length micro-batches with our policy loss and chunked vocab-parallel log-probs, then
    the optimizer step (Adam allocates its m and v in the first; the second is the steady
    state, where they exist during the forward/backward);
    the weight sync of the stage: the TP-gathered Hugging Face tensors in buckets of
    ``rollout.sglang.weight_bucket_mb`` (``weight_sync.plan.HFExport`` +
    ``weight_sync.buckets.iter_buckets``), plus SGLang's flattened copy of each bucket
    when colocated (``weight_sync: tensor``).

:class:`~.tracker.StorageTracker` counts the bytes of every live storage meanwhile. The
schedule's memory is periodic once its warm-up is over, so a step runs
``min(m, 2 PP)`` micro-batches instead of the config's ``m`` (the same number in flight, which
:func:`measured_micro_batches` checks against the plan's formula). What it cannot see stays in
the plan's reserve: the CUDA context, NCCL buffers, the caching allocator's rounding and
fragmentation, Transformer Engine's workspaces and FP8 scaling tensors; an FP8 config is
measured in bf16.
"""

from __future__ import annotations

import time
import warnings
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch

from ..config import Config
from .memory import GIB, Layout, Workload, in_flight_micro_batches, stage_name
from .tracker import BACKWARD

META = torch.device("meta")

# Tags of the tracker (phases of the step; the static state is re-tagged by object)
WEIGHTS, GRADIENTS, OPTIMIZER, REFERENCE = "weights", "gradients", "optimizer", "reference"
FORWARD, LOGITS, STEP, SYNC = "forward", "logits", "optimizer step", "weight sync"
# A CPU tensor larger than this made during the measurement means that a full-size tensor was
# allocated for real (the largest legitimate ones are a few small index and RNG tensors).
ELSEWHERE_LIMIT = 64 * 2**20


@dataclass(frozen=True)
class MeasuredStage:
    """What one rank's tensors took, in bytes (each item the most it held at once)."""
    stage: str
    pipeline_rank: int
    params: int                  # parameters of this rank
    micro_batches: int           # per step, as measured (module docstring)
    weights: int
    gradients: int               # Megatron DDP's fp32 gradient buffers (padding included)
    optimizer: int               # fp32 main parameters and Adam m, v of this DP shard
    reference: int               # the frozen reference model (kl_coef > 0)
    activations: int             # made by the forward passes: kept in flight, and temporaries
    logits: int                  # the output layer, logits, loss and log-probs
    backward: int                # made by autograd: gradients in flight, recomputation
    optimizer_step: int          # temporaries of the optimizer step
    weight_sync: int             # buckets and gathered parameters of the weight sync
    peak: int                    # the largest total of live bytes
    peak_phase: str
    peak_by_tag: dict            # what was live at the peak
    phase_peaks: dict            # the largest total in each phase of the second step and sync
    seconds: float


def measured_micro_batches(layout: Layout, num_micro_batches: int) -> int:
    """The micro-batches a measured step runs: ``min(m, 2 PP)`` (a multiple of PP, as the
    interleaved schedule wants), after checking that every pipeline rank then holds as many in
    flight as with ``m``."""
    pp = layout.pipeline
    measured = min(num_micro_batches, 2 * pp)
    for rank in range(pp):
        full = in_flight_micro_batches(rank, pp, layout.virtual, num_micro_batches)
        if in_flight_micro_batches(rank, pp, layout.virtual, measured) != full:
            raise AssertionError(f"{measured} micro-batches leave pipeline rank {rank} with "
                                 f"fewer in flight than {num_micro_batches}")
    return measured


def _micro_batch(work: Workload) -> "MicroBatch":
    """One full-length micro-batch, on the meta device (shapes only)."""
    from ..trainer.micro_batch import MicroBatch

    b, s = work.micro_batch_size, work.seq_length
    return MicroBatch(tokens=torch.empty(b, s, dtype=torch.long, device=META),
                      loss_mask=torch.empty(b, s, dtype=torch.float32, device=META),
                      advantages=torch.empty(b, dtype=torch.float32, device=META))


def _optimizer_tensors(optimizer) -> list[torch.Tensor]:
    """The fp32 main parameters and state tensors of Megatron's (chained) optimizer."""
    tensors = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        tensors += [p for group in inner.param_groups for p in group["params"]]
        tensors += [t for state in inner.state.values() for t in state.values()
                    if isinstance(t, torch.Tensor)]
    return tensors


class RankUnderMeasurement:
    """One rank of ``cfg`` in ``layout`` (TP 0, DP 0 of pipeline rank ``pipeline_rank``) built
    at full size on the meta device under a :class:`~.tracker.StorageTracker`, as a context
    manager: :meth:`train_step` runs Megatron's training step, :meth:`tag_state` tags the
    weights, gradient buffers and optimizer states, :meth:`weight_sync` streams the stage's
    weights; :attr:`chunks`, :attr:`trainer` and :attr:`tracker` are there to look at."""

    def __init__(self, cfg: Config, layout: Layout, work: Workload, pipeline_rank: int,
                 micro_batches: Optional[int] = None):
        self.cfg, self.layout, self.work, self.pipeline_rank = cfg, layout, work, pipeline_rank
        self.num_micro_batches = micro_batches or measured_micro_batches(
            layout, work.num_micro_batches)
        self.tracker = None
        self._exit = ExitStack()

    def __enter__(self) -> "RankUnderMeasurement":
        try:
            self._build()
        except BaseException:
            self._exit.close()
            raise
        return self

    def _build(self) -> None:
        from ..algorithm import LossNormalisers, LossParams
        from ..runtime.cpu_compat import cuda_redirected_to
        from ..trainer.loss import LossContext
        from ..trainer.train_step import PolicyTrainer
        from .fake_world import MetaValues, fake_rank
        from .gpu_layers import build_measured_model
        from .tracker import StorageTracker

        cfg, work, arch = self.cfg, self.work, self.cfg.architecture()
        self.tracker = tracker = StorageTracker(META)
        enter = self._exit.enter_context
        # Megatron's advice on GPU settings (CUDA_DEVICE_MAX_CONNECTIONS, fused attention) and
        # torch's deprecation notices say nothing about the measurement.
        enter(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        enter(cuda_redirected_to(META))
        enter(torch.compiler.set_stance("force_eager"))
        enter(fake_rank(cfg.parallel, self.layout.data, self.pipeline_rank))
        enter(MetaValues())
        enter(tracker)
        with tracker.in_phase(WEIGHTS):
            self.chunks = build_measured_model(arch, cfg.model, cfg.parallel, work.seq_length)
        if work.reference_model:
            with tracker.in_phase(REFERENCE):
                self.reference = build_measured_model(arch, cfg.model, cfg.parallel,
                                                      work.seq_length)
            for chunk in self.reference:
                chunk.requires_grad_(False)
        with tracker.in_phase("DDP and optimizer"):
            self.trainer = PolicyTrainer(
                self.chunks, cfg.optimizer,
                LossParams.from_config(cfg.algorithm, max_new_tokens=cfg.rollout.max_new_tokens),
                cfg.train_steps, cfg.rollout.temperature or 1.0, arch.vocab_size)
        m, b, s = self.num_micro_batches, work.micro_batch_size, work.seq_length
        self.micro_batches = [_micro_batch(work) for _ in range(m)]
        self.loss_context = LossContext(
            self.trainer.loss_params, LossNormalisers(num_tokens=m * b * s, num_sequences=m * b),
            m, self.layout.data, self.trainer.temperature, self.trainer.vocab_size)
        for chunk in self.chunks:
            if getattr(chunk, "output_layer", None) is not None:
                chunk.output_layer.register_forward_pre_hook(self._logits)

    def __exit__(self, *exc):
        return self._exit.__exit__(*exc)

    # ---- the step, with the tracker's phases ---------------------------------------------------
    def _logits(self, *_):
        self.tracker.phase = LOGITS

    def _forward_step(self, data_iterator, model):
        from ..trainer.loss import policy_forward_step

        self.tracker.phase = FORWARD
        output, loss_func = policy_forward_step(self.loss_context, data_iterator, model)
        return output, partial(self._loss, loss_func)

    def _loss(self, loss_func, output):
        self.tracker.phase = LOGITS
        result = loss_func(output)
        self.tracker.phase = FORWARD
        return result

    def train_step(self) -> None:
        """Megatron's training step: the pipeline schedule over the micro-batches with our
        policy loss (phases ``forward``, ``logits``), then the optimizer step. Not
        ``PolicyTrainer.train_step`` itself, which also broadcasts metrics as Python objects
        (a fake process group carries no bytes); the tensors are the same."""
        from ..trainer.forward import run_schedule

        for chunk in self.trainer.model:
            chunk.train()
            chunk.zero_grad_buffer()
        self.trainer.optimizer.zero_grad()
        with self.tracker.in_phase(FORWARD):
            run_schedule(self.trainer.model, self.micro_batches, self._forward_step,
                         forward_only=False)
        with self.tracker.in_phase(STEP):
            self.trainer.optimizer.step()

    def tag_state(self) -> None:
        """Tag the weights, the gradient buffers and the optimizer's tensors by object."""
        params = [p for chunk in self.chunks for p in chunk.parameters()]
        # the optimizer first: in fp32 its parameters are the model's, which stay weights
        self.tracker.retag(_optimizer_tensors(self.trainer.optimizer), OPTIMIZER)
        self.tracker.retag(params, WEIGHTS)
        self.tracker.retag([p.main_grad for p in params], GRADIENTS)

    def weight_sync(self) -> None:
        """The stage's weight sync as the trainer streams it (``weight_sync.streamer.WeightStreamer``):
        Hugging Face-named buckets of TP-gathered tensors, one at a time, each flattened by
        SGLang's ``FlattenedTensorBucket`` when colocated (``weight_sync: tensor``)."""
        from ..weight_sync.plan import HFExport
        from ..weight_sync.buckets import iter_buckets

        sglang = self.cfg.rollout.sglang
        flatten = _sglang_flattener() if sglang.weight_sync == "tensor" else None
        with self.tracker.in_phase(SYNC):
            for bucket in iter_buckets(
                    HFExport(self.chunks, self.cfg.architecture()).named_tensors(),
                    sglang.weight_bucket_mb << 20):
                flat = flatten(named_tensors=bucket) if flatten else None
                del bucket, flat

    def result(self, seconds: float) -> MeasuredStage:
        """What the tracker saw, item by item (after :meth:`tag_state`)."""
        tracker, peak = self.tracker, self.tracker.peak
        elsewhere, where = tracker.largest_elsewhere
        if elsewhere > ELSEWHERE_LIMIT:
            raise RuntimeError(f"the measurement allocated {elsewhere / GIB:.2f} GiB outside "
                               f"the meta device ({where}): a full-size tensor was made for real")
        most = tracker.tag_max
        return MeasuredStage(
            stage=stage_name(self.pipeline_rank, self.layout.pipeline),
            pipeline_rank=self.pipeline_rank,
            params=sum(p.numel() for chunk in self.chunks for p in chunk.parameters()),
            micro_batches=self.num_micro_batches,
            weights=most[WEIGHTS], gradients=most[GRADIENTS], optimizer=most[OPTIMIZER],
            reference=most[REFERENCE], activations=most[FORWARD], logits=most[LOGITS],
            backward=most[BACKWARD], optimizer_step=most[STEP], weight_sync=most[SYNC],
            peak=peak.bytes, peak_phase=peak.phase,
            peak_by_tag={k: v for k, v in peak.by_tag.items() if v},
            phase_peaks=dict(tracker.phase_peaks), seconds=seconds)


def _sglang_flattener():
    try:
        from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket
    except ImportError as e:
        raise RuntimeError("measuring weight_sync=tensor needs SGLang importable: its "
                           "FlattenedTensorBucket makes the bucket copies") from e
    return FlattenedTensorBucket


def measure_stage(cfg: Config, layout: Layout, work: Workload, pipeline_rank: int
                  ) -> MeasuredStage:
    """Measure pipeline rank ``pipeline_rank`` of ``cfg`` in ``layout`` (module docstring)."""
    start = time.perf_counter()
    with RankUnderMeasurement(cfg, layout, work, pipeline_rank) as rank:
        rank.train_step()                    # Adam's m and v appear here
        rank.tag_state()
        rank.tracker.reset_peaks()
        rank.train_step()                    # the steady state
        rank.weight_sync()
        return rank.result(time.perf_counter() - start)


def measure_plan(cfg: Config, layout: Layout, work: Workload) -> list[MeasuredStage]:
    """The first and the last pipeline stage (one without PP), as
    :func:`~.memory.plan_stages` plans them."""
    return [measure_stage(cfg, layout, work, rank)
            for rank in sorted({0, layout.pipeline - 1})]
