"""RL runs of a testbed policy through the real training loop, each in its own process.

:func:`run_config` is the config of one run (the embedded engine, Megatron's local spec, fp32;
:func:`serve_rollout` swaps in a ``repo-megatron serve`` worker);
:func:`run_many` trains several configs, ``parallel`` at a time, each with
``repo_megatron.run.loop.train`` in a fresh process (``run_distributed``, gloo), and returns
their ``metrics.jsonl`` rows and wall times.
"""

from __future__ import annotations

import copy
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional, Sequence


def run_config(model_dir: str, train_path: str, run_dir: str, *, steps: int, seed: int,
               lr: float, prompts_per_step: int, group_size: int, max_new_tokens: int,
               injection: str = "none", eval_path: Optional[str] = None,
               eval_max_prompts: int = 64, eval_interval: int = 0,
               algorithm: Optional[dict] = None, rollout: Optional[dict] = None,
               hf_export: bool = False) -> dict:
    """The config dict of one run on a testbed model directory (``model.hf_path``); the
    Megatron conversion is cached inside the model directory, which is rewritten whole.
    ``algorithm`` and ``rollout`` override keys of those sections."""
    alg = {"injection": injection, "loss_agg_mode": "token-mean",
           "micro_batch_size": prompts_per_step * group_size}
    for key, value in (algorithm or {}).items():
        alg[key] = {**alg.get(key, {}), **value} if isinstance(value, dict) else value
    return {
        "run_dir": run_dir, "seed": seed, "train_steps": steps,
        "model": {"hf_path": model_dir, "cache_dir": f"{model_dir}/megatron",
                  "transformer_impl": "local", "params_dtype": "fp32"},
        "rollout": {"engine": "embedded", "prompts_per_step": prompts_per_step,
                    "group_size": group_size, "temperature": 1.0,
                    "max_new_tokens": max_new_tokens, **(rollout or {})},
        "algorithm": alg,
        "optimizer": {"lr": lr, "clip_grad": 1.0},
        "data": {"path": train_path, "eval_path": eval_path, "eval_interval": eval_interval,
                 "eval_max_prompts": eval_max_prompts, "reward": "math", "reward_workers": 1},
        "checkpoint": {"save_interval": 0, "keep_last": 1, "hf_export_at_end": hf_export},
        "logging": {"tensorboard": False, "progress_bar": False, "level": "WARNING"},
    }


def serve_rollout(model_dir: str, run_dir: str, port: int, batch_size: Optional[int] = None,
                  weight_sync: str = "disk") -> dict:
    """``rollout`` overrides for a run whose rollouts come from one ``repo-megatron serve``
    worker with one thread that the run launches on ``port`` (SGLang's protocol, the SGLang
    engine's client, disk weight sync); ``batch_size``: sequences it decodes together."""
    import os
    import sys

    args = ["--model", model_dir, "--threads", "1", "--weights-root", run_dir]
    if batch_size is not None:
        args += ["--batch-size", str(batch_size)]
    return {"engine": "sglang",
            "sglang": {"weight_sync": weight_sync, "disk_dir": os.path.join(run_dir, "sync"),
                       "launch": {"num_servers": 1, "base_port": port,
                                  "command": [sys.executable, "-m", "repo_megatron.cli",
                                              "serve"],
                                  "args": args, "startup_timeout_s": 300}}}


def train_rows(cfg: dict) -> list[dict]:
    """Train ``cfg`` (in this process) and return its metric rows."""
    from ..config import config_from_dict
    from ..metrics.writer import read_rows
    from ..run.loop import train

    train(config_from_dict(copy.deepcopy(cfg)))
    return read_rows(cfg["run_dir"])


@dataclass
class RunResult:
    rows: list[dict]   # metrics.jsonl
    wall_s: float      # process start to end: imports, set-up, steps, evals, checkpoint


def run_many(configs: Sequence[dict], parallel: int = 2, timeout: float = 1800,
             fn=train_rows) -> list[RunResult]:
    """``fn(cfg)`` (metric rows) for every config, each in its own single-rank gloo process,
    ``parallel`` processes at a time (each uses one thread); in the order of ``configs``."""
    from ..runtime.launch import run_distributed

    def one(cfg: dict) -> RunResult:
        start = time.perf_counter()
        rows = run_distributed(fn, 1, cfg, timeout=timeout)[0]
        return RunResult(rows, time.perf_counter() - start)

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        return list(pool.map(one, configs))
