"""Asynchronous rollouts: step time at ``rollout.max_staleness`` k = 0 (synchronous) and k = 1.

The workload gives generation and training one core each: the trainer is one gloo rank with
one torch thread (``repo_megatron.runtime.launch``), the rollouts come from one
``repo-megatron serve`` worker with ``--threads 1`` in its own process, which the run launches
itself (``rollout.sglang.launch``, disk weight sync). The policy is the learning tests'
testbed (:mod:`repo_megatron.testbed`: a tiny character-level Llama warmed up to answer ``a+b``
right ~30% of the time), trained with GRPO on every sum. Both runs start from the same weights
with the same seed, prompts per step, G, max_new_tokens and learning rate; only
``rollout.max_staleness`` differs. Runs go one at a time, ``--repeats`` of each, alternating
k = 0 and k = 1, so that a change of the machine's load between runs does not decide the ratio.

The serve worker decodes ``--serve-batch-size`` sequences together (2; SGLang's
``--max-running-requests``), which makes generation take about as long as training (``--ppo-epochs
3``), the case the overlap is for: the sums' answers are 3 tokens, and decoding all 64 together
takes 0.13 s beside 0.74 s of training, where no overlap could give better than 0.85.

At k = 0 a step costs generation + training; at k = 1 the rollout of step t+1 runs on the
server while Megatron trains step t, so a step costs about max(generation, training) plus the
weight sync. Step time is the median ``time/step_s`` over the steps after the first
``--skip`` of every run of that k (start-up effects); the ratio k=1 / k=0 is the figure (goal
<= 0.65).

Prints one line per run and ends with ONE JSON line: the step times, their ratio, the time the
k = 0 step spends waiting for its rollout (generation, rewards, RePO stage) and the rest, the
mean staleness of the k = 1 run's trained samples, the on-policy reward curves of both (first
repeat) over the same steps, and the 1-minute load average before each run.

    python benchmarks/async_rollout.py [--steps 12] [--repeats 2] [--serve-batch-size 2]
                                       [--hidden 256] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def run_config_for(k: int, model_dir: str, prompts: str, out: str, args, port: int) -> dict:
    """The config of the run at ``max_staleness=k`` (its own serve worker on ``port``)."""
    from repo_megatron.testbed.runs import run_config, serve_rollout

    run_dir = os.path.join(out, f"k{k}")  # out: the repeat's directory
    rollout = serve_rollout(model_dir, run_dir, port, batch_size=args.serve_batch_size)
    return run_config(model_dir, prompts, run_dir, steps=args.steps, seed=args.seed, lr=args.lr,
                      prompts_per_step=args.prompts_per_step, group_size=args.group_size,
                      max_new_tokens=args.max_new_tokens,
                      algorithm={"ppo_epochs": args.ppo_epochs},
                      rollout={**rollout, "max_staleness": k})


def summarise(runs: list[list[dict]], skip: int) -> dict:
    """Medians over the steps after the first ``skip`` of every run, and the first run's
    curves."""
    timed = [r for rows in runs for r in [r for r in rows if r["step"] > 0][skip:]]
    first = [r for r in runs[0] if r["step"] > 0]

    def median(key: str) -> float:
        return statistics.median(r.get(key, 0.0) for r in timed)

    return {"step_s": median("time/step_s"), "rollout_wait_s": median("time/rollout_wait_s"),
            "sync_wait_s": median("time/sync_wait_s"),
            "reward_curve": [round(r["rollout/reward_onpolicy_mean"], 4) for r in first],
            "staleness_mean": statistics.fmean(r.get("rollout/staleness_mean", 0.0)
                                               for r in first),
            "staleness_max": max(r.get("rollout/staleness_max", 0.0) for r in first)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="Run directories (default: a temporary one)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--skip", type=int, default=2, help="First steps left out of the timing")
    parser.add_argument("--repeats", type=int, default=2,
                        help="Runs of each k, alternating k = 0 and k = 1")
    parser.add_argument("--prompts-per-step", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--ppo-epochs", type=int, default=3,
                        help="Optimizer passes per batch (with 2 or more, k = 0 recomputes the "
                             "old log-probs as k = 1 does: the same training work)")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--warmup-steps", type=int, default=300)
    parser.add_argument("--serve-batch-size", type=int, default=2,
                        help="Sequences the serve worker decodes together (SGLang's "
                             "--max-running-requests): sizes the generation")
    parser.add_argument("--hidden", type=int, default=256,
                        help="Hidden size of the testbed Llama (128: the learning tests'); "
                             "larger makes both sides' work torch compute, as on a real model")
    args = parser.parse_args()

    from repo_megatron.data.synthetic import write_jsonl
    from repo_megatron.runtime.ports import free_port
    from repo_megatron.testbed import tasks
    from repo_megatron.testbed.runs import run_many
    from repo_megatron.testbed.warmup import WarmupRecipe, warm_policy

    out = args.out or tempfile.mkdtemp(prefix="async_rollout_")
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    # the learning tests' sums policy (tests/learning/conftest.py), --hidden wide
    recipe = WarmupRecipe(mixture={"sum": 1.0}, steps=args.warmup_steps, batch_size=32,
                          lr=3e-3, correct_share=0.3, seed=0,
                          shape={"hidden_size": args.hidden,
                                 "intermediate_size": 3 * args.hidden,
                                 "num_attention_heads": args.hidden // 32,
                                 "num_key_value_heads": args.hidden // 64, "head_dim": 32})
    model_dir = warm_policy(os.path.join(out, "model"), recipe)
    prompts = os.path.join(out, "sums.jsonl")
    write_jsonl(prompts, tasks.all_sums(), "sum")
    print(f"warm-up {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)

    # k = 0 and k = 1 alternate, one run at a time (each run has the machine to itself): on a
    # shared machine, a change of load between two long runs would decide the ratio
    rows: dict[int, list] = {0: [], 1: []}
    loads = []
    for repeat in range(args.repeats):
        for k in (0, 1):
            run_dir = os.path.join(out, f"r{repeat}")
            cfg = run_config_for(k, model_dir, prompts, run_dir, args, free_port())
            loads.append(os.getloadavg()[0])
            run, = run_many([cfg], parallel=1)
            rows[k].append(run.rows)
            figures = summarise([run.rows], args.skip)
            print(f"repeat {repeat} k={k}: median step {figures['step_s']:.2f} s, waited for "
                  f"the rollout {figures['rollout_wait_s']:.2f} s and before the sync "
                  f"{figures['sync_wait_s']:.2f} s a step, run {run.wall_s:.0f} s",
                  file=sys.stderr, flush=True)
    loads.append(os.getloadavg()[0])
    results = {k: summarise(runs, args.skip) for k, runs in rows.items()}

    sync, overlapped = results[0], results[1]
    print(json.dumps({
        "benchmark": "async_rollout", "steps": args.steps, "timed_steps": args.steps - args.skip,
        "hidden": args.hidden, "prompts_per_step": args.prompts_per_step, "group_size": args.group_size,
        "max_new_tokens": args.max_new_tokens, "ppo_epochs": args.ppo_epochs,
        "trainer_threads": 1, "serve_threads": 1, "serve_batch_size": args.serve_batch_size,
        "repeats": args.repeats,
        "step_s_k0": round(sync["step_s"], 3), "step_s_k1": round(overlapped["step_s"], 3),
        "ratio_k1_over_k0": round(overlapped["step_s"] / sync["step_s"], 3),
        "ratio_goal": 0.65,
        # k = 0: the step waits for all of the rollout; the rest is training and the sync
        "rollout_s_k0": round(sync["rollout_wait_s"], 3),
        "train_and_sync_s_k0": round(sync["step_s"] - sync["rollout_wait_s"], 3),
        "staleness_mean_k1": round(overlapped["staleness_mean"], 3),
        "staleness_max_k1": overlapped["staleness_max"],
        "rollout_wait_s_k1": round(overlapped["rollout_wait_s"], 3),
        "sync_wait_s_k1": round(overlapped["sync_wait_s"], 3),
        "reward_onpolicy_k0": sync["reward_curve"], "reward_onpolicy_k1": overlapped["reward_curve"],
        "load_average_1min": [round(x, 1) for x in loads],   # before each run, and at the end
        "wall_s": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
    main()
