"""``repo-megatron train CONFIG --dry-run``: the config's real parallel layout on a laptop.

Builds the config's TP x PP (x virtual PP) x DP process groups on gloo with a scaled-down model
of the same shape ratios (heads per KV head, tied or untied embeddings, rope settings; one KV
head per TP rank, two layers per model chunk, a 1000-token vocabulary) in the config's
precision and optimizer (bf16 with fp32 main weights, the distributed optimizer), and runs one
full step through the trainer's own phases (:class:`~.session.Session`): synthetic rollout
groups made by rank 0 and broadcast over the control plane, old log-probs, the loss through
Megatron's pipeline schedule, the optimizer step, the weight sync into a sink engine on rank 0
(which checks that every parameter arrived), and a checkpoint saved and loaded back. A layout
error shows here in minutes instead of after hours in a queue.

What cannot run on a CPU is substituted, each substitution logged in one line: the local layer
spec for Transformer Engine, sequence parallelism and FP8 off (both need TE), gloo for NCCL,
random weights for ``model.load``, synthetic groups for the rollout engine.

Run directly it spawns the TP x PP x DP processes itself (DP defaults to 1: the layout errors
are in TP and PP), forked from one process that imported the trainer once, so 32 or 64 ranks
share those pages; under torchrun or srun it uses the processes it is given.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
import resource
import sys
import tempfile
import time
from functools import partial
from typing import Callable, ContextManager, Iterable, Optional

import torch

from ..config import Config
from ..engines.base import RolloutEngine
from ..rollout.types import Group, Prompt, Sample
from ..runtime.launch import DistributedRunError, run_distributed
from .rollout_side import RolloutSide

log = logging.getLogger(__name__)

DRY_VOCAB = 1000
DEVICE_FAITHFUL_NOTE = (
    "dry run: device-faithful: every rank tracks which tensors a GPU run holds on the GPU "
    "(repo_megatron.runtime.device_faithful) and fails the step where CUDA or NCCL would: a "
    "host tensor meeting a device tensor, a host tensor in an NCCL collective, a device tensor "
    "on the gloo control plane")
# What every rank imports (the trainer and the parts of megatron-core a step uses): loaded
# once in the fork server, shared by the forked ranks.
RANK_IMPORTS = ["repo_megatron.run.session", "megatron.core.models.gpt",
                "megatron.core.distributed", "megatron.core.optimizer",
                "megatron.core.pipeline_parallel", "megatron.core.dist_checkpointing"]


def scaled_overrides(cfg: Config) -> dict:
    """config.json overrides for a small model with the layout's divisibility and the real
    model's head ratio."""
    arch = cfg.architecture()
    p = cfg.parallel
    tp, chunks = p.tensor_model_parallel_size, p.pipeline_model_parallel_size * (
        p.virtual_pipeline_model_parallel_size or 1)
    kv = tp
    heads = kv * (arch.num_attention_heads // arch.num_query_groups)
    head_dim = 8
    hidden = heads * head_dim
    return {"num_hidden_layers": 2 * chunks, "hidden_size": hidden,
            "intermediate_size": 2 * hidden, "num_attention_heads": heads,
            "num_key_value_heads": kv, "head_dim": head_dim, "vocab_size": DRY_VOCAB,
            "max_position_embeddings": 256}


def _substitution(key: str, old, new, why: str) -> str:
    return f"dry run: {key}={old} -> {new} ({why})"


def dry_config(cfg: Config, run_dir: str) -> tuple[Config, list[str]]:
    """The config to dry-run and the substitutions made, one line each: scaled model, random
    weights, the local spec without sequence parallelism or FP8, gloo, synthetic groups, one
    step of small batches, no HF export. Precision, optimizer, recomputation and the parallel
    layout stay as configured."""
    m, p = cfg.model, cfg.parallel
    arch = cfg.architecture()
    scaled = scaled_overrides(cfg)
    notes = [f"dry run: model {arch.num_layers} layers, hidden {arch.hidden_size}, "
             f"{arch.num_attention_heads} heads / {arch.num_query_groups} KV heads -> "
             f"{scaled['num_hidden_layers']} layers, hidden {scaled['hidden_size']}, "
             f"{scaled['num_attention_heads']} heads / {scaled['num_key_value_heads']} KV heads, "
             f"vocabulary {DRY_VOCAB} (same head ratio and layout divisibility)"]
    if m.load or not m.random_init:
        notes.append(_substitution("model.load", m.load or m.hf_path, "random weights",
                                   "the scaled model has no checkpoint"))
    if m.transformer_impl != "local":
        notes.append(_substitution("model.transformer_impl", m.transformer_impl, "local",
                                   "Transformer Engine needs a GPU"))
    if p.sequence_parallel:
        notes.append(_substitution("parallel.sequence_parallel", "true", "false",
                                   "needs the Transformer Engine spec"))
    if m.fp8 is not None:
        notes.append(_substitution("model.fp8", m.fp8, "null", "needs Transformer Engine on a GPU"))
    if p.distributed_backend != "gloo":
        notes.append(_substitution("parallel.distributed_backend", p.distributed_backend,
                                   "gloo", "CPU processes"))
    notes.append(_substitution("rollout.engine", cfg.rollout.engine, "synthetic groups",
                               "rank 0 makes them; no server is started"))
    model = dataclasses.replace(m, random_init=True, load=None, fp8=None, transformer_impl="local",
                                architecture_overrides={**m.architecture_overrides, **scaled})
    parallel = dataclasses.replace(p, sequence_parallel=False, distributed_backend="gloo")
    rollout = dataclasses.replace(cfg.rollout, prompts_per_step=4, group_size=4,
                                  max_new_tokens=16, engine="embedded")
    algorithm = dataclasses.replace(cfg.algorithm, micro_batch_size=2, global_batch_size=None,
                                    ppo_epochs=1)
    checkpoint = dataclasses.replace(cfg.checkpoint, directory=None, hf_export_at_end=False)
    logging_cfg = dataclasses.replace(cfg.logging, tensorboard=False, wandb_project=None)
    return dataclasses.replace(cfg, model=model, parallel=parallel, rollout=rollout,
                               algorithm=algorithm, checkpoint=checkpoint, logging=logging_cfg,
                               run_dir=run_dir, train_steps=1), notes


def synthetic_groups(prompts: int, group_size: int, max_new_tokens: int, seed: int,
                     injection: str = "repo") -> list[Group]:
    """Random token groups shaped like a step of ``injection``: ragged prompts and responses,
    0/1 rewards, valid behaviour log-probs on the sampled responses, and sample 0 of each group
    injected as that algorithm injects it (RePO: a rephrase, trained under the original prompt,
    with no behaviour log-probs; LUFFY: the expert trace, off-policy; GRPO: none)."""
    rng = random.Random(seed)
    groups = []
    for i in range(prompts):
        prompt = Prompt(uid=f"dry:{i}", question="", answer="", solution="k",
                        prompt_ids=tuple(rng.randrange(DRY_VOCAB) for _ in range(rng.randint(4, 12))))
        samples = []
        for j in range(group_size):
            n = rng.randint(2, max_new_tokens)
            injected = j == 0 and injection in ("repo", "luffy")
            samples.append(Sample(
                prompt_uid=prompt.uid, prompt_ids=prompt.prompt_ids,
                response_ids=[rng.randrange(DRY_VOCAB) for _ in range(n)], response_text="",
                reward=float(injected or rng.random() < 0.3), reward_reason="synthetic",
                finish_reason="expert" if injected and injection == "luffy" else "stop",
                is_rephrased=injected and injection == "repo",
                is_offpolicy=injected and injection == "luffy",
                behaviour_logprobs=None if injected else [-rng.random() * 5 for _ in range(n)]))
        groups.append(Group(prompt=prompt, samples=samples, gate_fired=True,
                            injected_index=0 if injection in ("repo", "luffy") else None))
    return groups


class SyncSink(RolloutEngine):
    """The dry run's rollout engine: it samples nothing and counts the weights synced to it."""

    def __init__(self):
        self.tensors = 0
        self.parameters = 0

    def generate(self, prompts, params):
        raise RuntimeError("the dry run's groups are synthetic: nothing is generated")

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]],
                       version: Optional[int] = None) -> None:
        for name, tensor in named_tensors:
            if not torch.isfinite(tensor).all():
                raise ValueError(f"weight sync: {name} is not finite")
            self.tensors += 1
            self.parameters += tensor.numel()
        self._version = self._version + 1 if version is None else version


class SyntheticRollout(RolloutSide):
    """Rank 0's rollout side in a dry run: synthetic groups, and the sink as the engine."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.engine = SyncSink()

    def rollout(self, step: int):
        r = self.cfg.rollout
        groups = synthetic_groups(r.prompts_per_step, r.group_size, r.max_new_tokens,
                                  self.cfg.seed + step, self.cfg.algorithm.injection)
        return groups, {"rollout/groups": float(len(groups))}

    def evaluate(self) -> dict:
        return {}

    def state(self) -> dict:
        return {"synthetic": True}

    def load_state(self, state: dict) -> None:
        if not state.get("synthetic"):
            raise ValueError("the checkpoint's rollout state is not the dry run's")

    def export(self, weights: dict, out: str) -> None:
        raise RuntimeError("the dry run exports no Hugging Face weights")


def training_state(session) -> list[torch.Tensor]:
    """This rank's weights, the optimizer's (fp32 main) weights and Adam's moments: what a
    checkpoint must bring back."""
    optimizer = session.trainer.optimizer
    tensors = [p for chunk in session.chunks for p in chunk.parameters()]
    for inner in (o.optimizer for o in getattr(optimizer, "chained_optimizers", [optimizer])):
        tensors += [p for group in inner.param_groups for p in group["params"]]
        tensors += [v for state in inner.state.values() for v in state.values()
                    if torch.is_tensor(v) and v.dim() > 0]
    return tensors


def _checksum(tensors: list[torch.Tensor]) -> float:
    return float(sum(t.detach().double().abs().sum() for t in tensors))


def _no_phase(name: str) -> ContextManager:
    return contextlib.nullcontext()


def run_step(cfg: Config, level: str = "INFO",
             phase: Callable[[str], ContextManager] = _no_phase) -> dict:
    """One step of the (already scaled) config in this process's place of the layout. On a
    CPU it runs device-faithful (:mod:`repo_megatron.runtime.device_faithful`): a host tensor
    where a GPU run needs a device one, or the reverse, fails the step as it would fail on the
    cluster. ``phase(name)`` wraps each phase (``build``, ``rollout``, ``prepare``, ``train``,
    ``weight_sync``, ``checkpoint_save``, ``checkpoint_load``): the GPU check measures them."""
    from ..runtime import cpu_compat
    from .session import Session

    logging.getLogger().setLevel(level)
    cpu_compat.enable(device_faithful=True)
    t0 = time.perf_counter()
    with phase("build"):        # model, optimizer, initial weights
        session = Session(cfg, rollout=partial(SyntheticRollout, cfg))
    try:
        with phase("rollout"):  # synthetic groups, broadcast over the control plane
            groups, metrics = session.rollout(1)
        with phase("prepare"):  # advantages, micro-batches, old (and reference) log-probs
            prepared = session.prepare(groups)
        with phase("train"):    # the loss through the pipeline schedule, the optimizer step
            metrics.update(session.update(prepared))
        with phase("weight_sync"):
            session.sync_weights()
        with phase("checkpoint_save"):
            session.save(1)
        before = _checksum(training_state(session))
        with torch.no_grad():  # so that only the load can bring them back
            for tensor in training_state(session):
                tensor.zero_()
        with phase("checkpoint_load"):
            restored_step = session.restore()
        ps = session.ps
        sink = session.rollout_side.engine
        return {"rank": torch.distributed.get_rank(), "tp": ps.get_tensor_model_parallel_rank(),
                "pp": ps.get_pipeline_model_parallel_rank(), "dp": ps.get_data_parallel_rank(),
                "params": sum(p.numel() for c in session.chunks for p in c.parameters()),
                "loss": metrics["train/loss"], "grad_norm": metrics["train/grad_norm"],
                "metrics": metrics,
                "restored": restored_step == 1 and _checksum(training_state(session)) == before,
                "synced": None if sink is None else (sink.tensors, sink.parameters),
                "seconds": time.perf_counter() - t0,
                # placement checked: device-faithful on a CPU, or a real GPU
                "device_faithful": cpu_compat.device_faithful() or cpu_compat.has_gpu(),
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    finally:
        session.close()


def expected_parameters(cfg: Config) -> int:
    """Parameters of the scaled model in Hugging Face form (what a weight sync delivers)."""
    from ..plan.memory import stage_params

    arch = cfg.architecture()
    return stage_params(arch, arch.vocab_size, tp=1, pp=1, first=True, last=True)


def verdict(results: list[dict], cfg: Config) -> list[str]:
    """What went wrong in these ranks' results (all ranks, or this rank's under torchrun);
    empty when the step passed."""
    problems = []
    if len({r["loss"] for r in results}) != 1:
        problems.append("ranks disagree on the full-batch loss")
    problems += [f"rank {r['rank']}: the checkpoint did not bring back the weights and the "
                 f"optimizer state" for r in results
                 if not r["restored"]]
    expected = expected_parameters(cfg)
    problems += [f"weight sync delivered {r['synced'][1]} parameters to the engine, the model "
                 f"has {expected}" for r in results
                 if r["rank"] == 0 and r["synced"][1] != expected]
    problems += [f"rank {r['rank']}: ran on the CPU without the device-faithful checks"
                 for r in results if not r["device_faithful"]]
    return problems


def dry_run(cfg: Config, data_parallel_size: int = 1, timeout_s: float = 1800) -> int:
    """Run the dry run; prints one line per rank and a verdict. Returns the exit code."""
    p = cfg.parallel
    world = p.tensor_model_parallel_size * p.pipeline_model_parallel_size * data_parallel_size
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="repo-dry-run-") as tmp:
        scaled, notes = dry_config(cfg, tmp)
        for note in notes + [DEVICE_FAITHFUL_NOTE]:
            log.info("%s", note)
        arch = scaled.architecture()
        print(f"dry run: TP {p.tensor_model_parallel_size} x PP {p.pipeline_model_parallel_size}"
              f"{f' (virtual {p.virtual_pipeline_model_parallel_size})' if p.virtual_pipeline_model_parallel_size else ''}"
              f" x DP {data_parallel_size} = {world} gloo processes; scaled model: "
              f"{arch.num_layers} layers, hidden {arch.hidden_size}, {arch.num_attention_heads} "
              f"heads / {arch.num_query_groups} KV heads, tied embeddings "
              f"{arch.tie_word_embeddings}, {scaled.model.params_dtype}"
              f"{', distributed optimizer' if scaled.optimizer.use_distributed_optimizer else ''}",
              flush=True)
        level = scaled.logging.level
        if "WORLD_SIZE" in os.environ:  # launched by torchrun / srun: we are one of the ranks
            results = [run_step(scaled, level)]
        else:
            try:
                results = run_distributed(run_step, world, scaled, level, timeout=timeout_s,
                                          preload=RANK_IMPORTS)
            except DistributedRunError as e:
                print(f"dry run FAILED: {e}", file=sys.stderr)
                return 1
    for r in sorted(results, key=lambda r: r["rank"]):
        print(f"  rank {r['rank']:3d} (tp {r['tp']}, pp {r['pp']}, dp {r['dp']}): "
              f"{r['params']:,} parameters, loss {r['loss']:.6f}, grad norm "
              f"{r['grad_norm']:.6f}, {r['seconds']:.1f} s, peak RSS {r['peak_rss_mib']:.0f} MiB")
    problems = verdict(results, scaled)
    if problems:
        print("dry run FAILED: " + "; ".join(problems), file=sys.stderr)
        return 1
    synced = [r["synced"] for r in results if r["rank"] == 0]
    sync = f"weight sync of {synced[0][0]} tensors ({synced[0][1]:,} parameters), " if synced else ""
    print(f"dry run passed in {time.perf_counter() - t0:.0f} s, device-faithful: one step, "
          f"{sync}checkpoint save "
          f"and load in this layout")
    return 0
