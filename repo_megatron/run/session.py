"""Everything one training run holds, built from the config, with one method per phase.

The loop (:mod:`.loop`) calls these in order each step: :meth:`Session.rollout` (rank 0 runs the
RePO stage on the rollout engine; the groups are broadcast), :meth:`Session.prepare` (advantages,
the DP slice, micro-batches, old and reference log-probs recomputed by Megatron under the
ORIGINAL prompts), :meth:`Session.update` (``ppo_epochs`` optimizer steps),
:meth:`Session.sync_weights` (Megatron -> rollout engine), :meth:`Session.save`.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import math
import os
from dataclasses import dataclass, field
from statistics import fmean
from typing import Optional

import torch

from ..algorithm import LossParams
from ..algorithm.provenance import finalize_provenance_metrics, is_provenance_sum
from ..checkpoint.manager import CheckpointManager
from ..checkpoint.model_io import load_model, save_model, sharded_model_state
from ..config import Config
from ..errors import OutputExistsError, UserError
from ..metrics.ledger import LEDGER_FILE, HardSampleLedger
from ..metrics.sources import source_metrics
from ..metrics.writer import MetricsWriter, read_rows, truncate_after
from ..models.architecture import padded_vocab_size
from ..models.builder import build_model, sequence_length_multiple
from ..rewards.scorers import build_rewards, scorer_metrics
from ..runtime import control, distributed
from ..trainer.forward import forward_logprobs
from ..trainer.train_step import PolicyTrainer, build_reference_model
from . import batch as B
from ..rollout.metrics import mean
from ..train.engine_sync import WeightStreamer, gather_hf_weights
from .guard import TrainingStopped
from .prompts import MixtureSampler

log = logging.getLogger(__name__)

LOSS_KEYS = ("tokens", "loss_mask", "advantages", "old_logprobs", "provenance")
# How the distributed optimizer's state is checkpointed: Megatron-LM's default, reshardable
# across DP (the model weights reshard in any layout). megatron-core 0.16-0.19 cannot save
# their own default (fully_sharded_model_space: "flattened_range is not supported"), and
# fully_reshardable does not load back into torch's Adam (KeyError 'step' without TE/apex).
OPTIMIZER_CHECKPOINT_FORMAT = {"distrib_optim_sharding_type": "dp_reshardable"}


def _rank() -> int:
    return torch.distributed.get_rank()


def converted_checkpoint(cfg: Config, arch) -> str:
    """The torch_dist checkpoint of ``model.hf_path`` / ``model.gguf_file`` for this run's
    vocabulary padding, converted on first use into ``model.cache_dir`` (atomically: a
    temporary directory renamed into place) and reused afterwards."""
    from ..convert import convert_hf_to_megatron

    m, tp = cfg.model, cfg.parallel.tensor_model_parallel_size
    source = os.path.abspath(m.hf_path) if m.hf_path else ""
    name = os.path.basename(source.rstrip("/")) or os.path.splitext(m.gguf_file or "model")[0]
    key = hashlib.sha1(f"{source}|{m.gguf_file}".encode()).hexdigest()[:10]
    vocab = padded_vocab_size(arch.vocab_size, m.make_vocab_size_divisible_by, tp)
    out = os.path.join(os.path.expanduser(m.cache_dir), f"{name}-{key}-vocab{vocab}")
    if _rank() == 0 and not os.path.isdir(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
        # One conversion per cache entry at a time: runs started together (a sweep, the
        # benchmarks' parallel arms) wait for the first one and reuse its copy.
        with open(out + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not os.path.isdir(out):
                log.info("Converting %s to Megatron torch_dist (first use) -> %s",
                         m.gguf_file or source, out)
                # Written aside and renamed into place: out exists only once complete.
                try:
                    convert_hf_to_megatron(
                        m.hf_path, out, tp=tp, gguf_file=m.gguf_file,
                        make_vocab_size_divisible_by=m.make_vocab_size_divisible_by)
                except OutputExistsError:  # a run without the lock converted it first
                    log.info("%s was converted by another process meanwhile: using it", out)
    control.barrier()  # the others wait for rank 0's conversion (hours for a 70B model)
    return out


@dataclass
class PreparedBatch:
    """One rollout step's training data on this rank: lists of micro-batches, one list per
    optimizer step, plus the step's mismatch metrics. ``deferred`` holds the full
    micro-batches when old log-probs come from the training forward itself (one optimizer
    step): their mismatch metrics are measured by :meth:`Session.update`."""
    minibatches: list[list[dict]]
    metrics: dict = field(default_factory=dict)
    deferred: Optional[list[dict]] = None


def _onpolicy(mb: dict) -> torch.Tensor:
    """[b] sequences sampled from pi(. | q) with their behaviour log-probs."""
    return mb["has_behaviour"] & ~mb["is_replay"] & ~mb["is_rephrased"]


def _add_mismatch(total: Optional[torch.Tensor], mb: dict, old: torch.Tensor) -> torch.Tensor:
    """``total`` plus the train/rollout mismatch ``[sum, max, tokens]`` of micro-batch ``mb``
    under ``old``, on the device of ``old``."""
    m = B.mismatch_metrics(old, mb["behaviour_logprobs"], mb["loss_mask"], _onpolicy(mb))
    if total is None:
        return m
    return torch.stack([total[0] + m[0], torch.maximum(total[1], m[1]), total[2] + m[2]])


class Session:
    """``rollout=False`` builds only the trainer side (the dry run feeds synthetic groups)."""

    def __init__(self, cfg: Config, rollout: bool = True):
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
        data = self._rank0_first(lambda: load_run_data(cfg)) if rollout else None
        # The RL step the weights are from: the engine's weight version, so that a resumed run
        # samples under the same versions as an uninterrupted one.
        self.policy_version = 0

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
        self.rollout_side = RolloutSide(cfg, data) if (self.is_rank0 and rollout) else None
        control.barrier()  # rank 0 may have launched SGLang servers: minutes
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
        if not self.trainer.parameters_finite():
            raise TrainingStopped(f"step {step}: a weight is NaN or infinite; not checkpointing "
                                  "it, the last good checkpoint is kept")
        trainer_state = {"step": step, "scheduler": self.trainer.scheduler.state_dict()}
        if self.rollout_side is not None:
            trainer_state.update(self.rollout_side.state())
        return self.checkpoints.save(step, self._sharded_state(loading=False), trainer_state)

    def restore(self) -> int:
        """Load the newest intact checkpoint (older ones are tried when the newest fails
        verification); returns its step (0 if there is none)."""
        found = self.checkpoints.load_newest_intact(lambda: self._sharded_state(loading=True))
        if found is None:
            if self.is_rank0:
                log.warning("--resume: no complete checkpoint in %s; starting from step 0",
                            self.checkpoints.directory)
                truncate_after(self.run_dir, 0)  # the killed run's steps are redone
            return 0
        step, path, loaded, state = found
        self.policy_version = step
        for i, chunk in enumerate(self.chunks):
            chunk.load_state_dict(loaded[f"model{i}"])
        with torch.no_grad():  # fp32 main params are views of the weights
            self.trainer.optimizer.load_state_dict(loaded["optimizer"])
        self.trainer.scheduler.load_state_dict(state["scheduler"])
        if self.rollout_side is not None:
            self.rollout_side.load_state(state)
        if self.is_rank0:
            truncate_after(self.run_dir, step)
            log.info("Resumed from %s (step %d)", path, step)
        return step

    # ---- one step ---------------------------------------------------------------------------

    def rollout(self, step: int):
        """Groups (and rollout metrics) of this step, identical on every rank."""
        payload = self.rollout_side.rollout(step) if self.rollout_side is not None else None
        return control.broadcast_object(payload)  # the others wait on gloo, not NCCL

    def prepare(self, groups) -> PreparedBatch:
        cfg, ps = self.cfg, self.ps
        alg = cfg.algorithm
        adv = B.group_advantages(groups, alg.advantage_estimator, alg.advantage_eps)
        full = B.build_global_batch(groups, adv, pad_id=0)
        gbs = alg.global_batch_size or B.num_sequences(full)
        interleaved = cfg.parallel.virtual_pipeline_model_parallel_size is not None
        keys = list(LOSS_KEYS)
        if alg.injection == "luffy":
            keys.append("is_offpolicy")
        if alg.replay.enabled:
            keys += ["is_replay", "behaviour_logprobs"]
        if self.reference is not None:
            keys.append("ref_logprobs")
        num_minibatches = math.ceil(B.num_sequences(full) / gbs)
        # One optimizer step on this batch and no TIS weights: the old policy is the policy of
        # the training forward itself, so its detached log-probs serve and the separate
        # forward is skipped (train_step takes them when old_logprobs is None).
        reuse = alg.ppo_epochs == 1 and num_minibatches == 1 and alg.tis_cap is None
        mismatch = None
        minibatches = []
        for start in range(0, B.num_sequences(full), gbs):
            part = B.select(full, slice(start, start + gbs))
            shard = B.data_parallel_slice(
                part, ps.get_data_parallel_rank(), ps.get_data_parallel_world_size(),
                alg.micro_batch_size,
                multiple_of=cfg.parallel.pipeline_model_parallel_size if interleaved else 1)
            mbs = B.micro_batches(shard, alg.micro_batch_size, keys=list(shard),
                                  length_multiple=sequence_length_multiple(cfg.model, cfg.parallel))
            olds = [None] * len(mbs) if reuse else self.trainer.compute_logprobs(mbs)
            refs = (forward_logprobs(self.reference, mbs, self.temperature, self.arch.vocab_size)
                    if self.reference is not None else [None] * len(mbs))
            for mb, old, ref in zip(mbs, olds, refs):
                mb["old_logprobs"], mb["ref_logprobs"] = old, ref
                if old is None:
                    continue
                mismatch = _add_mismatch(mismatch, mb, old)
                if alg.tis_cap is not None:
                    weights = B.truncated_importance_weights(
                        old, mb["behaviour_logprobs"], mb["loss_mask"], _onpolicy(mb), alg.tis_cap)
                    mb["advantages"] = mb["advantages"].to(weights.device)[:, None] * weights
            minibatches.append([{k: mb[k] for k in keys} for mb in mbs])
        if reuse:
            return PreparedBatch(minibatches, deferred=mbs)
        return PreparedBatch(minibatches, self._reduce_mismatch(mismatch))

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

    def sync_weights(self) -> None:
        """Megatron's weights -> the rollout engine as weight version ``policy_version``,
        streamed by every pipeline stage (:mod:`repo_megatron.train.engine_sync`)."""
        self.weight_streamer.sync(self.rollout_side.engine if self.rollout_side is not None
                                  else None, version=self.policy_version)

    def export_hf(self, step: int) -> None:
        """Hugging Face safetensors, config and tokenizer of the current weights, in
        ``RUN_DIR/hf/step_N`` (written aside, then renamed into place)."""
        weights = gather_hf_weights(self.weight_streamer)
        if self.rollout_side is not None:
            out = os.path.join(self.run_dir, "hf", f"step_{step:06d}")
            self.rollout_side.export(weights, out)
        control.barrier()

    def initial_eval_recorded(self) -> bool:
        """Whether the run directory holds the step-0 eval already (a resumed run killed
        before its first checkpoint); the same answer on every rank."""
        rows = read_rows(self.run_dir) if self.is_rank0 else []
        return control.broadcast_object(any(r.get("step") == 0 and "eval/solve_rate" in r for r in rows))

    def evaluate(self) -> dict:
        return control.broadcast_object(
            self.rollout_side.evaluate() if self.rollout_side is not None else {})

    def close(self) -> None:
        self.checkpoints.close()  # commits a background save still in flight
        self.weight_streamer.close()
        self.writer.close()
        if self.rollout_side is not None:
            self.rollout_side.close()
        distributed.teardown()


@dataclass
class RunData:
    """What rank 0 reads before the model is built: the tokenizer and the checked prompts."""
    tokenizer: object
    formatter: object
    sources: list        # [(Source, [Prompt])]: data.sources, or the one file of data.path
    eval_prompts: list


def load_run_data(cfg: Config) -> RunData:
    """The tokenizer and every prompt of ``data.sources`` (or ``data.path``) and
    ``data.eval_path``, validated (DataError names the file or source, row and column)."""
    from ..data import ChatFormatter, load_prompts, load_sources, load_tokenizer

    tokenizer = load_tokenizer(cfg.model.hf_path, cfg.model.gguf_file)
    formatter = ChatFormatter.from_config(tokenizer, cfg.data)
    sources = load_sources(cfg.data, formatter)
    eval_prompts = (load_prompts(cfg.data, formatter, cfg.data.eval_path)
                    [:cfg.data.eval_max_prompts] if cfg.data.eval_path else [])
    return RunData(tokenizer, formatter, sources, eval_prompts)


class RolloutSide:
    """Rank 0's half of the run: tokenizer, prompts, the rollout engine, rewards, the RePO stage."""

    def __init__(self, cfg: Config, data: "RunData"):
        from ..rollout.stage import RolloutStage

        self.cfg = cfg
        self.engine = self.servers = None
        # started first: the reward workers import the reward while the engine is built
        self.rewards = build_rewards(cfg.data, {s.name: s.reward for s, _ in data.sources},
                                     log_dir=os.path.join(cfg.run_dir, "judge_servers"))
        tokenizer, self.formatter = data.tokenizer, data.formatter
        self.sampler = MixtureSampler({s.name: (prompts, s.weight) for s, prompts in data.sources},
                                      cfg.seed, cfg.data.shuffle)
        self.ledger = HardSampleLedger(cfg.algorithm.repo.reward_threshold)
        self.eval_prompts = data.eval_prompts
        try:
            self.hf_config = hf_config(cfg)
            if cfg.rollout.sglang.launch.num_servers > 0:  # SGLang servers this run starts
                cfg = self._launch_servers(cfg)
            self.engine = build_engine(cfg, tokenizer, self.hf_config)
        except BaseException:
            self.close()
            raise
        self.stage = RolloutStage(self.engine, self.formatter, self.rewards, cfg.rollout,
                                  cfg.algorithm, seed=cfg.seed)

    def _launch_servers(self, cfg: Config) -> Config:
        """Start ``rollout.sglang.launch`` servers (and router); the config pointing at them."""
        import dataclasses

        from ..sglang.launcher import ServerLauncher

        sg = cfg.rollout.sglang
        self.servers = ServerLauncher(sg.launch, log_dir=os.path.join(cfg.run_dir, "servers"))
        try:
            urls, router_url = self.servers.start()
        except BaseException:
            self.servers.stop()
            raise
        sg = dataclasses.replace(sg, urls=urls, router_url=router_url)
        return dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, sglang=sg))

    def rollout(self, step: int):
        n = self.cfg.rollout.prompts_per_step
        batch = self.stage.run(self.sampler.take(n), step, refill=self.sampler.take)
        self.engine.release_memory()          # colocated servers free their GPU for training
        threshold = self.cfg.algorithm.repo.reward_threshold
        metrics = {**batch.metrics, **scorer_metrics(self.rewards),
                   **self.ledger.record(step, batch.sampled)}
        if len(self.sampler.names) > 1:
            metrics.update(source_metrics(batch.sampled, batch.groups, self.sampler.names,
                                          threshold))
        self.ledger.export(self.ledger_path, step)
        return batch.groups, metrics

    @property
    def ledger_path(self) -> str:
        return os.path.join(self.cfg.run_dir, LEDGER_FILE)

    def evaluate(self) -> dict:
        """Solve rate of greedy answers on the held-out prompts (the hard-set solve rate)."""
        from ..rewards.base import RewardRequest
        from ..rollout.stage import sampling_params

        if not self.eval_prompts:
            return {}
        params = sampling_params(self.cfg.rollout)
        greedy = type(params)(**{**params.__dict__, "temperature": 0.0, "seed": 0})
        results = self.engine.generate([list(p.prompt_ids) for p in self.eval_prompts],
                                       [greedy] * len(self.eval_prompts))
        scores = self.rewards.score([RewardRequest.for_prompt(p, r.text)
                                     for p, r in zip(self.eval_prompts, results)])
        threshold = self.cfg.algorithm.repo.reward_threshold
        return {"eval/solve_rate": fmean(s.value >= threshold for s in scores),
                "eval/prompts": float(len(scores))}

    def export(self, weights: dict, out: str) -> None:
        from ..convert.output import atomic_directory
        from ..convert.safetensors_io import write_safetensors

        # Written aside, then swapped in whole: a reader never sees a mix of two exports.
        with atomic_directory(out, overwrite=True, flag="export") as tmp:
            write_safetensors(tmp, weights.items(), max_shard_bytes=4 << 30)
            self.hf_config.save_pretrained(tmp)
            self.formatter.tokenizer.save_pretrained(tmp)
        log.info("Exported Hugging Face weights to %s", out)

    def state(self) -> dict:
        """Plain data only (checkpoints are loaded with ``weights_only``)."""
        replay = self.stage.replay
        return {"sampler": self.sampler.state(),
                "replay": replay.state() if replay is not None else None,
                "ledger": self.ledger.state(), "injection": self.stage.injection.state()}

    def load_state(self, state: dict) -> None:
        self.sampler.load_state(state["sampler"])
        if self.stage.replay is not None and state.get("replay") is not None:
            self.stage.replay.load_state(state["replay"])
        self.ledger.load_state(state.get("ledger"))
        self.stage.injection.load_state(state.get("injection") or {})
        self.ledger.export(self.ledger_path)    # drop what a killed run recorded after it

    def close(self) -> None:
        """Stop the reward workers, judge servers, engine and rollout servers (whatever was
        started)."""
        if self.rewards is not None:
            self.rewards.close()
        if hasattr(self.engine, "close"):
            self.engine.close()
        if self.servers is not None:
            self.servers.stop()


def hf_config(cfg: Config):
    """The model's transformers config, with ``model.architecture_overrides`` applied."""
    from transformers import AutoConfig

    from ..hf_files import load_hf_config_dict

    hf = load_hf_config_dict(cfg.model.hf_path, cfg.model.gguf_file)
    hf.update(cfg.model.architecture_overrides)
    hf.pop("transformers_version", None)
    return AutoConfig.for_model(hf.pop("model_type"), **hf)


def build_engine(cfg: Config, tokenizer, config):
    """The rollout engine the config asks for: SGLang servers, or the embedded CPU engine
    (a transformers model of the same architecture whose weights the first sync sets)."""
    sg = cfg.rollout.sglang
    engine = cfg.rollout.engine
    if engine == "sglang" or (engine == "auto" and (sg.urls or sg.router_url
                                                    or sg.launch.num_servers)):
        from ..sglang import SGLangEngine
        return SGLangEngine(sg)
    from transformers import AutoModelForCausalLM

    from ..rollout.hf_engine import HFEngine

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return HFEngine(model, tokenizer, batch_size=cfg.rollout.batch_size)
