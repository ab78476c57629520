"""Benchmark: what fixed micro-batches, token-budget micro-batches and sequence packing compute.

    python benchmarks/batching.py                       # the figures (minutes on 2 cores)
    python benchmarks/batching.py --measure-quickstart  # re-measure the quickstart's lengths

Two length distributions of one training step's sequences (prompt + response: what the
trainer computes):

- ``quickstart``: the sequences one real step of ``examples/configs/quickstart.yaml`` trained on
  (SmolLM2-135M on the embedded CPU engine, its rollouts, rephrases and injections), read from
  ``benchmarks/data/quickstart_lengths.json``. ``--measure-quickstart`` rewrites that file by
  running the quickstart's rollout stage (step 1, its seed) and records how it was measured.
- ``long_tailed``: 256 sequences drawn from a truncated Pareto law (shape 0.5) on 16..2048
  tokens: most short, a few at the limit (seed 0).

For each, at DP 4, the plans of :mod:`repo_megatron.run.batching` for
``fixed`` (``micro_batch_size`` 4, the quickstart's), ``token_budget``
(``max_tokens_per_microbatch`` = 4 x the longest sequence, i.e. the same activation memory a
fixed micro-batch of 4 may need) and ``packed`` (the same budget, ``sequence_packing``):
``padding_share`` (padded positions / computed positions, over all ranks) and ``dp_imbalance``
(the busiest rank's computed positions over the mean). These are the planner's own maps, the
ones the trainer runs.

Then the trainer's wall time per optimizer step on this CPU (a 2-layer Llama, hidden 128, 4
heads of 32, FFN 256, vocabulary 1000, fp32, the local spec, one process, 2 threads) on the first 64
sequences of the long-tailed batch: fixed micro-batches of 4 vs the token-budget plan, steps
alternating between the two, the median of 3 after one warm-up step each, in wall time and in
the process's CPU time (which a shared machine's other jobs disturb less). Ends with ONE JSON
line. Wall time: on a shared machine, run it under a lock the other heavy jobs take too.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
QUICKSTART = os.path.join(ROOT, "examples", "configs", "quickstart.yaml")
QUICKSTART_LENGTHS = os.path.join(ROOT, "benchmarks", "data", "quickstart_lengths.json")
DATA_PARALLEL = 4
MICRO_BATCH = 4
TIMED_SEQUENCES = 64
TIMED_STEPS = 3


def long_tailed_lengths(n: int = 256, low: int = 16, high: int = 2048, shape: float = 0.5,
                        seed: int = 0) -> list[int]:
    """``n`` lengths from a Pareto law of ``shape`` truncated to ``[low, high]`` (inverse CDF)."""
    rng = random.Random(seed)
    a, b = low ** -shape, high ** -shape
    return [min(high, max(low, round((a - rng.random() * (a - b)) ** (-1 / shape))))
            for _ in range(n)]


def measure_quickstart() -> dict:
    """Run step 1 of the quickstart's rollout stage (embedded engine, its seed) and return the
    prompt and response lengths of every sequence it hands to the trainer."""
    import torch

    from repo_megatron.cli import quiet_libraries
    from repo_megatron.config import load_config
    from repo_megatron.data.run_data import load_run_data
    from repo_megatron.run.rollout_side import EngineRollout

    torch.set_num_threads(2)
    quiet_libraries()
    with tempfile.TemporaryDirectory(prefix="batching_") as run_dir:
        cfg = load_config(QUICKSTART, [f"run_dir={run_dir}"])
        side = EngineRollout(cfg, load_run_data(cfg))
        try:
            start = time.perf_counter()
            groups, _ = side.rollout(1)
            seconds = time.perf_counter() - start
        finally:
            side.close()
    samples = [s for g in groups for s in g.samples]
    return {"how": "python benchmarks/batching.py --measure-quickstart: step 1 of "
                   "examples/configs/quickstart.yaml's rollout stage (embedded engine, seed "
                   f"{cfg.seed}), {time.strftime('%Y-%m-%d', time.gmtime())}, "
                   f"{seconds:.0f} s on 2 CPU cores",
            "prompt_lengths": [len(s.prompt_ids) for s in samples],
            "response_lengths": [len(s.response_ids) for s in samples]}


def plans(lengths: list[int], data_parallel_size: int, max_tokens: int) -> dict:
    """The fixed, token-budget and packed plans of ``lengths``, as the ``algorithm:`` section
    makes them (its defaults otherwise: ``microbatch_overhead_tokens`` among them)."""
    from repo_megatron.config.algorithm import AlgorithmConfig
    from repo_megatron.run.batching import plan_micro_batches

    configs = {"fixed": AlgorithmConfig(micro_batch_size=MICRO_BATCH),
               "token_budget": AlgorithmConfig(max_tokens_per_microbatch=max_tokens),
               "packed": AlgorithmConfig(max_tokens_per_microbatch=max_tokens,
                                         sequence_packing=True)}
    return {name: plan_micro_batches(lengths, data_parallel_size, alg)
            for name, alg in configs.items()}


def plan_figures(lengths: list[int], max_tokens: int) -> dict:
    """padding_share and dp_imbalance of the three plans of ``lengths`` at DP 4."""
    from repo_megatron.run.batching import plan_metrics

    out = {"sequences": len(lengths), "tokens": sum(lengths), "max_tokens": max_tokens}
    for name, plan in plans(lengths, DATA_PARALLEL, max_tokens).items():
        m = plan_metrics([plan], [lengths])
        out[name] = {"padding_share": round(m["padding_share"], 4),
                     "dp_imbalance": round(m["dp_imbalance"], 4),
                     "microbatches_per_rank": int(m["microbatches_per_rank"]),
                     "max_microbatch_tokens": int(m["max_microbatch_tokens"])}
    return out


def step_seconds(lengths: list[int], max_tokens: int) -> dict:
    """Median trainer wall time of one optimizer step on sequences of ``lengths`` (random
    tokens, a response of the last half), fixed micro-batches of 4 vs the token-budget plan."""
    import torch

    from repo_megatron.algorithm import LossParams
    from repo_megatron.config.model import ModelConfig
    from repo_megatron.config.optimizer import OptimizerConfig
    from repo_megatron.config.parallel import ParallelConfig
    from repo_megatron.models.architecture import read_architecture
    from repo_megatron.models.builder import build_model
    from repo_megatron.run import batch as B
    from repo_megatron.runtime.distributed import LaunchEnv, initialize, teardown
    from repo_megatron.runtime.ports import free_port
    from repo_megatron.trainer.micro_batch import MicroBatch
    from repo_megatron.trainer.train_step import PolicyTrainer
    from tests.helpers import write_tiny_llama

    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    n, longest = len(lengths), max(lengths)
    tokens = torch.randint(1, 1000, (n, longest), generator=g)
    position = torch.arange(longest)
    real = position < torch.tensor(lengths)[:, None]
    response = real & (position >= torch.tensor(lengths)[:, None] // 2)
    full = MicroBatch(tokens=tokens * real, loss_mask=(response & (position + 1 < torch.tensor(
        lengths)[:, None])).float(), advantages=torch.randn(n, generator=g),
        lengths=torch.tensor(lengths))
    timed = {name: plan for name, plan in plans(lengths, 1, max_tokens).items()
             if name != "packed"}
    parallel = ParallelConfig()
    initialize(parallel, seed=1, env=LaunchEnv(0, 1, 0, "127.0.0.1", free_port(), "single"))
    out = {"sequences": n, "tokens": sum(lengths), "max_tokens": max_tokens,
           "loadavg_start": os.getloadavg()[0]}
    try:
        with tempfile.TemporaryDirectory(prefix="batching_") as root:
            arch = read_architecture(write_tiny_llama(
                root, num_layers=2, hidden_size=128, intermediate_size=256, head_dim=32,
                max_position_embeddings=4096))
        runs = {}
        for name, plan in timed.items():
            torch.manual_seed(0)
            chunks = build_model(arch, ModelConfig(transformer_impl="local"), parallel)
            trainer = PolicyTrainer(chunks, OptimizerConfig(lr=1e-5), LossParams(),
                                    total_steps=TIMED_STEPS + 1)
            runs[name] = (trainer, B.micro_batches(full, plan[0]), [], [])
        # alternating the two (the first round warms up): a shared machine's load drifts
        for _ in range(TIMED_STEPS + 1):
            for trainer, micro_batches, wall, cpu in runs.values():
                start, start_cpu = time.perf_counter(), time.process_time()
                trainer.train_step(micro_batches)
                wall.append(time.perf_counter() - start)
                cpu.append(time.process_time() - start_cpu)
        for name, (_, micro_batches, wall, cpu) in runs.items():
            out[name] = {"step_s": round(statistics.median(wall[1:]), 3),
                         "steps_s": [round(x, 2) for x in wall],
                         "step_cpu_s": round(statistics.median(cpu[1:]), 3),
                         "microbatches": len(micro_batches),
                         "computed_tokens": sum(p.tokens for p in timed[name][0])}
    finally:
        teardown()
    out["loadavg_end"] = os.getloadavg()[0]
    for key in ("step_s", "step_cpu_s"):
        out[f"token_budget_over_fixed_{key}"] = round(out["token_budget"][key] /
                                                      out["fixed"][key], 3)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--measure-quickstart", action="store_true",
                        help=f"re-measure {os.path.relpath(QUICKSTART_LENGTHS, ROOT)} and stop")
    args = parser.parse_args(argv)
    if args.measure_quickstart:
        measured = measure_quickstart()
        os.makedirs(os.path.dirname(QUICKSTART_LENGTHS), exist_ok=True)
        with open(QUICKSTART_LENGTHS, "w") as f:
            json.dump(measured, f, indent=1)
        print(json.dumps(measured))
        return
    with open(QUICKSTART_LENGTHS) as f:
        measured = json.load(f)
    quickstart = [p + r for p, r in zip(measured["prompt_lengths"], measured["response_lengths"])]
    long_tailed = long_tailed_lengths()
    result = {"quickstart": {"source": measured["how"],
                             **plan_figures(quickstart, MICRO_BATCH * max(quickstart))},
              "long_tailed": plan_figures(long_tailed, MICRO_BATCH * max(long_tailed))}
    for name, figures in result.items():
        print(name, json.dumps(figures), flush=True)
    timed = long_tailed[:TIMED_SEQUENCES]
    result["step_time_long_tailed"] = step_seconds(timed, MICRO_BATCH * max(timed))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
