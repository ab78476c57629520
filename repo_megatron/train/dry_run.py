"""``repo-megatron train CONFIG --dry-run``: the config's real parallel layout on a laptop.

Builds the config's TP x PP (x virtual PP) x DP process groups on gloo with a scaled-down model
of the same shape ratios (heads per KV head, tied or untied embeddings, rope settings; one KV
head per TP rank, two layers per model chunk, a 1000-token vocabulary) and runs one full
training step on synthetic rollout groups: old log-probs, the loss through Megatron's pipeline
schedule, the optimizer step, the weight gather of the sync path, and a checkpoint saved and
loaded back. A layout error shows here in a minute instead of after hours in a queue.

Run directly it spawns the TP x PP x DP processes itself (DP defaults to 1: the layout errors
are in TP and PP); under torchrun or srun it uses the processes it is given.
"""

from __future__ import annotations

import dataclasses
import os
import random
import sys
import tempfile
import time

from ..config import Config
from ..runtime.launch import DistributedRunError, run_distributed
from ..rollout.types import Group, Prompt, Sample

DRY_VOCAB = 1000


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


def dry_config(cfg: Config, run_dir: str) -> Config:
    """The config to dry-run: scaled model, random weights, one step, small batches, no HF
    export, SGLang-free (groups are synthetic)."""
    model = dataclasses.replace(cfg.model, random_init=True, load=None, fp8=None,
                                architecture_overrides={**cfg.model.architecture_overrides,
                                                        **scaled_overrides(cfg)})
    rollout = dataclasses.replace(cfg.rollout, prompts_per_step=4, group_size=4,
                                  max_new_tokens=16, engine="embedded")
    algorithm = dataclasses.replace(cfg.algorithm, micro_batch_size=2, global_batch_size=None,
                                    ppo_epochs=1)
    checkpoint = dataclasses.replace(cfg.checkpoint, directory=None, hf_export_at_end=False)
    return dataclasses.replace(cfg, model=model, rollout=rollout, algorithm=algorithm,
                               checkpoint=checkpoint, run_dir=run_dir, train_steps=1)


def synthetic_groups(prompts: int, group_size: int, max_new_tokens: int, seed: int) -> list[Group]:
    """Random token groups shaped like a RePO step: ragged prompts and responses, 0/1 rewards,
    valid behaviour log-probs, and one rephrased (injected) sample per group."""
    rng = random.Random(seed)
    groups = []
    for i in range(prompts):
        prompt = Prompt(uid=f"dry:{i}", question="", answer="", solution="k",
                        prompt_ids=tuple(rng.randrange(DRY_VOCAB) for _ in range(rng.randint(4, 12))))
        samples = []
        for j in range(group_size):
            n = rng.randint(2, max_new_tokens)
            rephrased = j == 0
            samples.append(Sample(
                prompt_uid=prompt.uid, prompt_ids=prompt.prompt_ids,
                response_ids=[rng.randrange(DRY_VOCAB) for _ in range(n)], response_text="",
                reward=float(rephrased or rng.random() < 0.3), reward_reason="synthetic",
                finish_reason="stop", is_rephrased=rephrased,
                behaviour_logprobs=None if rephrased else [-rng.random() * 5 for _ in range(n)]))
        groups.append(Group(prompt=prompt, samples=samples, injected_index=0, gate_fired=True))
    return groups


def run_step(cfg: Config) -> dict:
    """One step of the (already scaled) config in this process's place of the layout."""
    import torch

    from .session import Session

    t0 = time.perf_counter()
    session = Session(cfg, rollout=False)
    try:
        groups = synthetic_groups(cfg.rollout.prompts_per_step, cfg.rollout.group_size,
                                  cfg.rollout.max_new_tokens, cfg.seed)
        metrics = session.update(session.prepare(groups))
        session.sync_weights()
        session.save(1)
        session.restore()
        ps = session.ps
        params = sum(p.numel() for c in session.chunks for p in c.parameters())
        return {"rank": torch.distributed.get_rank(), "tp": ps.get_tensor_model_parallel_rank(),
                "pp": ps.get_pipeline_model_parallel_rank(), "dp": ps.get_data_parallel_rank(),
                "params": params, "loss": metrics["train/loss"],
                "grad_norm": metrics["train/grad_norm"], "seconds": time.perf_counter() - t0}
    finally:
        session.close()


def dry_run(cfg: Config, data_parallel_size: int = 1, timeout_s: float = 900) -> int:
    """Run the dry run; prints one line per rank and a verdict. Returns the exit code."""
    p = cfg.parallel
    world = p.tensor_model_parallel_size * p.pipeline_model_parallel_size * data_parallel_size
    with tempfile.TemporaryDirectory(prefix="repo-dry-run-") as tmp:
        scaled = dry_config(cfg, tmp)
        arch = scaled.architecture()
        print(f"dry run: TP {p.tensor_model_parallel_size} x PP {p.pipeline_model_parallel_size}"
              f"{f' (virtual {p.virtual_pipeline_model_parallel_size})' if p.virtual_pipeline_model_parallel_size else ''}"
              f" x DP {data_parallel_size} = {world} gloo processes; scaled model: "
              f"{arch.num_layers} layers, hidden {arch.hidden_size}, {arch.num_attention_heads} "
              f"heads / {arch.num_query_groups} KV heads, tied embeddings "
              f"{arch.tie_word_embeddings}", flush=True)
        if "WORLD_SIZE" in os.environ:  # launched by torchrun / srun: we are one of the ranks
            results = [run_step(scaled)]
        else:
            try:
                results = run_distributed(run_step, world, scaled, timeout=timeout_s)
            except DistributedRunError as e:
                print(f"dry run FAILED: {e}", file=sys.stderr)
                return 1
    for r in sorted(results, key=lambda r: r["rank"]):
        print(f"  rank {r['rank']:3d} (tp {r['tp']}, pp {r['pp']}, dp {r['dp']}): "
              f"{r['params']:,} parameters, loss {r['loss']:.6f}, grad norm "
              f"{r['grad_norm']:.6f}, {r['seconds']:.1f} s")
    print("dry run passed: one step, weight gather and checkpoint save/load in this layout")
    return 0
