"""A trainer-only :class:`~repo_megatron.run.session.Session` on a tiny random Llama (what the
dry run builds): the real model, optimizer and checkpoint paths, with no data or engine."""

from __future__ import annotations

import os

import torch


def session(root: str, parallel: dict | None = None, **checkpoint):
    """A Session of the model in ``root/model``, run directory ``root/run``."""
    from repo_megatron.config import config_from_dict
    from repo_megatron.run.rollout_side import NoRollout
    from repo_megatron.run.session import Session

    cfg = config_from_dict({
        "run_dir": os.path.join(root, "run"), "seed": 5,
        "model": {"hf_path": os.path.join(root, "model"), "random_init": True,
                  "transformer_impl": "local"},
        "parallel": parallel or {},
        "rollout": {"prompts_per_step": 2, "group_size": 2, "max_new_tokens": 6},
        "algorithm": {"micro_batch_size": 2},
        "checkpoint": {"hf_export_at_end": False, **checkpoint},
        "logging": {"tensorboard": False, "progress_bar": False},
    })
    return Session(cfg, rollout=NoRollout)


def train_step(s, step: int) -> dict:
    """One real optimizer step on synthetic groups (weights and Adam states move), then every
    weight moved by a step-dependent amount, so each step's checkpoint differs visibly."""
    from repo_megatron.run.dry_run import synthetic_groups

    metrics = s.update(s.prepare(synthetic_groups(2, 2, 6, seed=step)))
    with torch.no_grad():
        for chunk in s.chunks:
            for p in chunk.parameters():
                p.add_(0.01 * step)
    return metrics


def weights_fingerprint(s) -> float:
    """A number that changes with any weight of this rank."""
    return float(sum(p.double().sum() for chunk in s.chunks for p in chunk.parameters()))


def corrupt_with_garbage(path: str, nbytes: int = 1 << 20) -> None:
    """Write ``nbytes`` of random bytes into ``path`` from its middle on (the file may grow)."""
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        f.write(os.urandom(nbytes))


def distcp_files(checkpoint: str) -> list[str]:
    return sorted(os.path.join(checkpoint, n) for n in os.listdir(checkpoint)
                  if n.endswith(".distcp"))
