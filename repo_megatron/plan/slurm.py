"""``python -m repo_megatron.plan.slurm CONFIG [key=value ...]``: the settings the SLURM scripts
in ``examples/slurm/`` need, read from the config, as shell assignments for ``eval``.

The scripts hold no training setting of their own: TP, PP, the model directory, the
checkpoint to load, the router port, the weight-sync strategy and the servers' extra
arguments (``rollout.sglang.launch.args``, with ``--enable-memory-saver`` where memory is released; a bash array) all come from here, so the
YAML (plus the same command-line overrides the trainer gets) stays the one source of truth.
A bad config fails here, before any node starts.
"""

from __future__ import annotations

import shlex
import sys
from typing import Optional, Sequence
from urllib.parse import urlparse

from ..config import Config, ConfigError, load_config

DEFAULT_ROUTER_PORT = 30080


def router_port(router_url: Optional[str]) -> int:
    """The port of ``rollout.sglang.router_url`` (the scripts start the router on it)."""
    if router_url is None:
        return DEFAULT_ROUTER_PORT
    try:
        port = urlparse(router_url).port
    except ValueError:
        port = None
    if port is None:
        raise ConfigError(f"rollout.sglang.router_url={router_url} needs an explicit port")
    return port


def launch_settings(cfg: Config) -> dict[str, str]:
    """``REPO_*`` name -> shell-quoted value (or array) for the launch scripts."""
    p = cfg.parallel
    values = {
        "REPO_TP": str(p.tensor_model_parallel_size),
        "REPO_PP": str(p.pipeline_model_parallel_size),
        "REPO_VPP": str(p.virtual_pipeline_model_parallel_size or ""),
        "REPO_MODEL_PARALLEL": str(p.model_parallel_size),
        "REPO_HF_PATH": cfg.model.hf_path or "",
        "REPO_LOAD": cfg.model.load or "",
        "REPO_VOCAB_DIVISIBLE_BY": str(cfg.model.make_vocab_size_divisible_by),
        "REPO_RUN_DIR": cfg.run_dir,
        "REPO_WEIGHT_SYNC": cfg.rollout.sglang.weight_sync,
        "REPO_ROUTER_PORT": str(router_port(cfg.rollout.sglang.router_url)),
    }
    settings = {name: shlex.quote(value) for name, value in values.items()}
    settings["REPO_SERVER_ARGS"] = "(" + " ".join(map(shlex.quote,
                                                      cfg.rollout.sglang.server_args)) + ")"
    return settings


def main(argv: Sequence[str]) -> int:
    if not argv:
        print("usage: python -m repo_megatron.plan.slurm CONFIG [key=value ...]", file=sys.stderr)
        return 2
    try:
        settings = launch_settings(load_config(argv[0], argv[1:]))
    except ConfigError as e:
        print(f"ConfigError: {e}", file=sys.stderr)
        return 2
    for name, value in settings.items():
        print(f"{name}={value}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
