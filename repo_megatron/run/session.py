"""Everything one training run holds, built from the config, with one method per phase.

The loop (:mod:`.loop`) calls these in order each step: :meth:`Session.rollout` (rank 0 runs the
RePO stage on the rollout engine, or takes the batch it ran ahead; the groups are broadcast),
:meth:`Session.rollout_ahead` (rank 0 starts the next steps' rollouts in the background when
``rollout.max_staleness > 0``), :meth:`Session.prepare` (advantages, the DP slice,
micro-batches, old and reference log-probs recomputed by Megatron under the ORIGINAL prompts),
:meth:`Session.update` (``ppo_epochs`` optimizer steps), :meth:`Session.sync_weights` (Megatron
-> rollout engine, once the rollouts ahead are done), :meth:`Session.save`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Optional

import torch

from ..algorithm import LossParams
from ..algorithm.provenance import finalize_provenance_metrics, is_provenance_sum
from ..checkpoint.manager import CheckpointManager
from ..checkpoint.model_io import load_model, save_model, sharded_model_state
from ..config import Config
from ..convert.cache import converted_checkpoint
from ..data.run_data import load_run_data
from ..errors import UserError
from ..metrics.writer import MetricsWriter, read_rows, truncate_after
from ..models.builder import build_model, sequence_length_multiple
from ..runtime import control, distributed
from ..trainer.forward import forward_logprobs, needs_equal_shapes
from ..trainer.micro_batch import MicroBatch
from ..trainer.train_step import PolicyTrainer, build_reference_model
from . import batch as B
from .batching import plan_metrics, plan_micro_batches
from ..rollout.metrics import mean
from ..rollout.staleness import check_staleness, staleness_metrics
from ..weight_sync.streamer import WeightStreamer, gather_hf_weights
from .async_rollout import AsyncRollout
from .colocation import build_colocation
from .guard import TrainingStopped
from .rollout_process import RolloutProcess, runs_in_own_process
from .rollout_side import EngineRollout, NoRollout, RolloutSide

log = logging.getLogger(__name__)

# How the distributed optimizer's state is checkpointed: Megatron-LM's default, reshardable
# across DP (the model weights reshard in any layout). megatron-core 0.16-0.19 cannot save
# their own default (fully_sharded_model_space: "flattened_range is not supported"), and
# fully_reshardable does not load back into torch's Adam (KeyError 'step' without TE/apex).
OPTIMIZER_CHECKPOINT_FORMAT = {"distrib_optim_sharding_type": "dp_reshardable"}


def _rank() -> int:
    return torch.distributed.get_rank()


@dataclass
class PreparedBatch:
    """One rollout step's training data on this rank: lists of micro-batches, one list per
    optimizer step, plus the step's mismatch metrics. ``deferred`` holds the full
    micro-batches when old log-probs come from the training forward itself (one optimizer
    step): their mismatch metrics are measured by :meth:`Session.update`."""
    minibatches: list[list[MicroBatch]]
    metrics: dict = field(default_factory=dict)
    deferred: Optional[list[MicroBatch]] = None


def _add_mismatch(total: Optional[torch.Tensor], mb: MicroBatch,
                  old: torch.Tensor) -> torch.Tensor:
    """``total`` plus the train/rollout mismatch ``[sum, max, tokens]`` of micro-batch ``mb``
    under ``old``, on the device of ``old``."""
    m = B.mismatch_metrics(old, mb.behaviour_logprobs, mb.loss_mask, mb.sampled_onpolicy)
    if total is None:
        return m
    return torch.stack([total[0] + m[0], torch.maximum(total[1], m[1]), total[2] + m[2]])


class Session:
    """One run's state on this rank. ``rollout`` builds rank 0's rollout side (after the model;
    every other rank gets a :class:`~.rollout_side.NoRollout`); None: the run's own, an
    :class:`~.rollout_side.EngineRollout` on the config's data and engine."""

    def __init__(self, cfg: Config, rollout: Optional[Callable[[], RolloutSide]] = None):
        self.cfg = cfg
        self.env = distributed.initialize(cfg.parallel, cfg.seed)
        from megatron.core import parallel_state as ps
        self.ps = ps
        self.is_rank0 = _rank() == 0
        self.arch = cfg.architecture()
        self.run_dir = cfg.run_dir
        self.checkpoints = CheckpointManager(
            cfg.checkpoint.directory or os.path.join(cfg.run_dir, "checkpoints"),
            cfg.checkpoint.keep_last, cfg.checkpoint.async_save, cfg.checkpoint.verify_checksums)
        self.checkpoints.remove_incomplete()
        # Prompts are read and checked first: a bad dataset stops every rank in seconds,
        # before minutes of model building.
        if rollout is None:
            # rollouts ahead of SGLang servers run in a process of their own (no shared GIL)
            side = RolloutProcess if runs_in_own_process(cfg) else EngineRollout
            rollout = partial(side, cfg, self._rank0_first(lambda: load_run_data(cfg)))
        # The RL step the weights are from: the engine's weight version, so that a resumed run
        # samples under the same versions as an uninterrupted one.
        self.policy_version = 0
        # Rank 0's rollout side first (it may launch SGLang servers: minutes), while the other
        # ranks wait on the control plane. A colocated engine then lets go of its GPU memory
        # before any rank builds the trainer beside it (a no-op for other engines).
        self.rollout_side = (AsyncRollout(rollout(), cfg.rollout.max_staleness, cfg.train_steps)
                             if self.is_rank0 else NoRollout())
        if self.rollout_side.engine is not None:
            self.rollout_side.engine.release_memory()
        control.barrier()
        try:
            self._build_trainer()
        except BaseException:
            self.rollout_side.close()   # servers and reward workers this run started
            raise

    def _build_trainer(self) -> None:
        """The policy's chunks with their initial weights, the optimizer, the reference model,
        the metrics writer, the colocation and the weight streamer."""
        cfg = self.cfg
        self.chunks = build_model(self.arch, cfg.model, cfg.parallel)
        init = self._initial_weights()
        self.trainer = PolicyTrainer(
            self.chunks, cfg.optimizer,
            LossParams.from_config(cfg.algorithm, max_new_tokens=cfg.rollout.max_new_tokens),
            total_steps=cfg.train_steps * cfg.algorithm.ppo_epochs * self._minibatches_per_step(),
            temperature=self.temperature, vocab_size=self.arch.vocab_size)
        self.reference = None
        if cfg.algorithm.kl_coef > 0:
            self.reference = build_reference_model(self.arch, cfg.model, cfg.parallel, init)
        self.writer = MetricsWriter(cfg.run_dir, enabled=self.is_rank0,
                                    tensorboard=cfg.logging.tensorboard,
                                    wandb_project=cfg.logging.wandb_project)
        # colocated runs: the trainer leaves the GPU while SGLang generates (colocation.py)
        self.colocation = build_colocation(cfg, self.trainer, self.reference,
                                           self.rollout_side.engine)
        self.weight_streamer = WeightStreamer(self.chunks, self.arch, cfg.rollout.sglang)

    # ---- set-up ----------------------------------------------------------------------------

    def _rank0_first(self, fn):
        """``fn()`` on rank 0; if it raises a :class:`UserError` (bad config or data), every
        rank stops (rank 0 with that error, the others naming it)."""
        result, problem = None, None
        if self.is_rank0:
            try:
                result = fn()
            except UserError as e:
                problem = e
        failed = control.broadcast_object(
            None if problem is None else f"{type(problem).__name__}: {problem}")
        if problem is not None:
            raise problem
        if failed is not None:
            raise TrainingStopped(f"rank 0 could not start the run: {failed}")
        return result

    @property
    def temperature(self) -> float:
        # The engine's log-probs are under the temperature-scaled distribution; greedy = 1.
        return self.cfg.rollout.temperature or 1.0

    def _minibatches_per_step(self) -> int:
        gbs = self.cfg.algorithm.global_batch_size
        sequences = self.cfg.rollout.prompts_per_step * self.cfg.rollout.group_size
        return 1 if gbs is None else math.ceil(sequences / gbs)

    def _initial_weights(self) -> Optional[str]:
        """Load the initial weights into the model; returns their torch_dist directory (the
        reference policy's too)."""
        m = self.cfg.model
        if m.load:
            path = m.load
        elif m.random_init:
            path = os.path.join(self.run_dir, "initial_weights")
            if not os.path.isdir(path):  # keep the random start: the reference policy
                save_model(self.chunks, path + ".tmp")
                if self.is_rank0:
                    os.rename(path + ".tmp", path)
                control.barrier()
        else:
            path = converted_checkpoint(self.cfg, self.arch)
        load_model(self.chunks, path)
        return path

    # ---- checkpoints -------------------------------------------------------------------------

    def _sharded_state(self, loading: bool) -> dict:
        model_state = sharded_model_state(self.chunks)
        # Nested per chunk, as Megatron-LM passes it: the chunks' dict keys repeat under
        # virtual PP (local layer numbers), so a flat merge would lose chunks.
        return {**model_state,
                "optimizer": self.trainer.optimizer.sharded_state_dict(
                    model_state, is_loading=loading, metadata=OPTIMIZER_CHECKPOINT_FORMAT)}

    def save(self, step: int) -> str:
        """Checkpoint the current state; a weight that is not finite stops the run instead."""
        self.colocation.training_phase()
        if not self.trainer.parameters_finite():
            raise TrainingStopped(f"step {step}: a weight is NaN or infinite; not checkpointing "
                                  "it, the last good checkpoint is kept")
        trainer_state = {"step": step, "scheduler": self.trainer.scheduler.state_dict(),
                         "policy_version": self.policy_version, **self.rollout_side.state()}
        return self.checkpoints.save(step, self._sharded_state(loading=False), trainer_state)

    def restore(self) -> int:
        """Load the newest intact checkpoint (older ones are tried when the newest fails
        verification); returns its step (0 if there is none)."""
        self.colocation.training_phase()
        found = self.checkpoints.load_newest_intact(lambda: self._sharded_state(loading=True))
        if found is None:
            if self.is_rank0:
                log.warning("--resume: no complete checkpoint in %s; starting from step 0",
                            self.checkpoints.directory)
                truncate_after(self.run_dir, 0)  # the killed run's steps are redone
            return 0
        step, path, loaded, state = found
        self.policy_version = state.get("policy_version", step)
        for i, chunk in enumerate(self.chunks):
            chunk.load_state_dict(loaded[f"model{i}"])
        with torch.no_grad():  # fp32 main params are views of the weights
            self.trainer.optimizer.load_state_dict(loaded["optimizer"])
        self.trainer.scheduler.load_state_dict(state["scheduler"])
        self.rollout_side.load_state(state)
        if self.is_rank0:
            truncate_after(self.run_dir, step)
            log.info("Resumed from %s (step %d)", path, step)
        return step

    # ---- one step ---------------------------------------------------------------------------

    def rollout(self, step: int):
        """Groups (and rollout metrics) of this step, identical on every rank; none of their
        samples is more than ``rollout.max_staleness`` weight versions behind the policy
        about to train on them (with ``max_staleness > 0``, the ``rollout/staleness_*``
        metrics say how far they are)."""
        self.colocation.rollout_phase()
        k = self.cfg.rollout.max_staleness
        start = time.perf_counter()
        result = self.rollout_side.rollout(step)
        if result is not None:   # rank 0: how long the trainer waited for it (k = 0: all of it)
            result[1]["time/rollout_wait_s"] = time.perf_counter() - start
        groups, metrics = control.broadcast_object(result)  # the others wait on gloo, not NCCL
        check_staleness(groups, self.policy_version, k, step)
        if k > 0:
            metrics.update(staleness_metrics(groups, self.policy_version, k))
        return groups, metrics

    def rollout_ahead(self, step: int) -> None:
        """Rank 0 starts the rollouts of steps up to ``step + rollout.max_staleness`` in the
        background (:class:`~.async_rollout.AsyncRollout`); nothing with ``max_staleness: 0``."""
        self.rollout_side.ahead(step)

    def prepare(self, groups) -> PreparedBatch:
        """Advantages, this rank's micro-batches (:mod:`.batching`'s plan: a fixed count or a
        token budget, balanced over the DP ranks), and their old (and reference) log-probs
        recomputed by Megatron under the original prompts, on those same micro-batches. The loss
        terms of the step follow from what the batch carries (:func:`.batch.build_global_batch`:
        LUFFY's with an expert trace, replay's with a replayed sample)."""
        self.colocation.training_phase()
        cfg, ps = self.cfg, self.ps
        alg = cfg.algorithm
        adv = B.group_advantages(groups, alg.advantage_estimator, alg.advantage_eps)
        full = B.build_global_batch(groups, adv, pad_id=0, policy_version=self.policy_version)
        gbs = alg.global_batch_size or full.num_sequences
        interleaved = cfg.parallel.virtual_pipeline_model_parallel_size is not None
        layout = dict(multiple=sequence_length_multiple(cfg.model, cfg.parallel),
                      multiple_of=cfg.parallel.pipeline_model_parallel_size if interleaved else 1,
                      equal_shapes=needs_equal_shapes(self.trainer.model))
        num_minibatches = math.ceil(full.num_sequences / gbs)
        # One optimizer step on this batch and no behaviour weights: the old policy is the
        # policy of the training forward itself, so its detached log-probs serve and the
        # separate forward is skipped (train_step takes them when old_logprobs is None).
        weighted = alg.tis_cap is not None or (
            alg.stale_tis_cap is not None and bool(B.stale_rows(full).any()))
        reuse = alg.ppo_epochs == 1 and num_minibatches == 1 and not weighted
        mismatch = None
        minibatches, plans, lengths = [], [], []
        for start in range(0, full.num_sequences, gbs):
            minibatch = full.select(slice(start, start + gbs))
            lengths.append(minibatch.lengths.tolist())
            plans.append(plan_micro_batches(lengths[-1], ps.get_data_parallel_world_size(),
                                            alg, **layout))
            mbs = B.micro_batches(minibatch, plans[-1][ps.get_data_parallel_rank()])
            olds = [None] * len(mbs) if reuse else self.trainer.compute_logprobs(mbs)
            refs = (forward_logprobs(self.reference, mbs, self.temperature, self.arch.vocab_size)
                    if self.reference is not None else [None] * len(mbs))
            for mb, old, ref in zip(mbs, olds, refs):
                mb.old_logprobs, mb.ref_logprobs = old, ref
                if old is None:
                    continue
                mismatch = _add_mismatch(mismatch, mb, old)
                weights = B.behaviour_weights(old, mb, alg.tis_cap, alg.stale_tis_cap)
                if weights is not None:    # decoupled PPO: pi_old / pi_behaviour, truncated
                    mb.advantages = mb.advantages.to(weights.device)[:, None] * weights
            minibatches.append(mbs)
        metrics = {f"batch/{k}": v for k, v in plan_metrics(plans, lengths).items()}
        metrics.update(self.colocation.take_metrics())   # colocated: the trainer's offload
        if reuse:
            return PreparedBatch(minibatches, metrics, deferred=mbs)
        return PreparedBatch(minibatches, {**metrics, **self._reduce_mismatch(mismatch)})

    def _reduce_mismatch(self, m: Optional[torch.Tensor]) -> dict:
        """The step's mismatch metrics from this rank's ``[sum, max, tokens]`` (device), reduced
        over the data-parallel group: every DP rank holds other sequences; the TP/PP ranks of
        one DP rank hold the same ones."""
        if m is None:
            return {}
        group = self.ps.get_data_parallel_group()
        sums, mx = m[[0, 2]], m[1:2]
        torch.distributed.all_reduce(sums, group=group)
        torch.distributed.all_reduce(mx, op=torch.distributed.ReduceOp.MAX, group=group)
        (total, tokens), (largest,) = sums.tolist(), mx.tolist()
        if tokens == 0:
            return {}
        return {"train/logprob_mismatch_mean": total / tokens,
                "train/logprob_mismatch_max": largest}

    def update(self, prepared: PreparedBatch) -> dict:
        """``ppo_epochs`` passes over the mini-batches, one optimizer step each."""
        epochs = self.cfg.algorithm.ppo_epochs
        results = [self.trainer.train_step(mbs) for _ in range(epochs)
                   for mbs in prepared.minibatches]
        mismatch = {}
        if prepared.deferred is not None:   # old log-probs came from the (only) step's forward
            total = None
            for mb, old in zip(prepared.deferred, results[0].logprobs):
                total = _add_mismatch(total, mb, old)
            mismatch = self._reduce_mismatch(total)
        names = [k for k in results[0].metrics if not is_provenance_sum(k)]
        metrics = {f"train/{k}": mean(r.metrics[k] for r in results) for k in names}
        # per-provenance sums add up over every optimizer step of the step
        totals = {k: sum(r.metrics[k] for r in results) for k in results[0].metrics
                  if is_provenance_sum(k)}
        metrics.update({f"train/{k}": v
                        for k, v in finalize_provenance_metrics(totals, epochs).items()})
        metrics.update({
            "train/loss": mean(r.loss for r in results),
            # NaN when a step was skipped for a non-finite gradient (max() would hide it)
            "train/grad_norm": max((r.grad_norm for r in results), key=lambda g: (g != g, g)),
            "train/lr": results[-1].lr,
            "train/optimizer_steps": float(len(results)),
            "train/skipped_updates": float(sum(not r.update_successful for r in results)),
            "train/nonfinite_skipped": float(sum(r.nonfinite for r in results)),
            "train/nonfinite_in_a_row": float(self.trainer.nonfinite_in_a_row),
        })
        self.policy_version += 1
        return {**metrics, **prepared.metrics, **mismatch}

    def sync_weights(self) -> dict:
        """Megatron's weights -> the rollout engine as weight version ``policy_version``,
        streamed by every pipeline stage (:mod:`repo_megatron.weight_sync.streamer`), once the
        rollouts running ahead have finished on the weights they started with (the other
        ranks wait on the control plane meanwhile). Returns how long that wait took (with
        ``rollout.max_staleness > 0``)."""
        start = time.perf_counter()
        self.rollout_side.wait()
        waited = time.perf_counter() - start
        self.colocation.training_phase()
        self.weight_streamer.sync(self.rollout_side.engine, version=self.policy_version)
        return {"time/sync_wait_s": waited} if self.cfg.rollout.max_staleness > 0 else {}

    def export_hf(self, step: int) -> None:
        """Hugging Face safetensors, config and tokenizer of the current weights, in
        ``RUN_DIR/hf/step_N`` (written aside, then renamed into place)."""
        self.colocation.training_phase()
        weights = gather_hf_weights(self.weight_streamer)
        self.rollout_side.export(weights, os.path.join(self.run_dir, "hf", f"step_{step:06d}"))
        control.barrier()

    def initial_eval_recorded(self) -> bool:
        """Whether the run directory holds the step-0 eval already (a resumed run killed
        before its first checkpoint); the same answer on every rank."""
        rows = read_rows(self.run_dir) if self.is_rank0 else []
        return control.broadcast_object(any(r.get("step") == 0 and "eval/solve_rate" in r for r in rows))

    def evaluate(self) -> dict:
        self.colocation.rollout_phase()
        return control.broadcast_object(self.rollout_side.evaluate())

    def close(self) -> None:
        self.checkpoints.close()  # commits a background save still in flight
        self.weight_streamer.close()
        self.writer.close()
        self.rollout_side.close()
        distributed.teardown()
