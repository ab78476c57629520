"""Training checkpoints: atomic, resumable, pruned to the last K.

Layout of ``CHECKPOINT_DIR``::

    step_000012/            a complete checkpoint (renamed into place as the last act)
      (torch_dist files)    model + optimizer, sharded: loads in any TP/PP/DP layout
      trainer_state.pt      step, data position, replay buffer, scheduler... (rank 0)
      rng/rank_00003.pt     each rank's RNG states
      meta.json             {"step": 12, "world_size": 4, ...}: written last, marks completeness
    .tmp-step_000013/       a save in progress (or killed mid-save): ignored, removed at start

A checkpoint directory exists under its final name only once every rank finished writing and
``meta.json`` is in it, so a run killed at any moment resumes from the newest complete one.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from typing import Any, Optional

import torch

from ..runtime.failpoints import failpoint

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d+)$")
META = "meta.json"


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def complete_checkpoints(directory: str) -> list[tuple[int, str]]:
    """``[(step, path)]`` of complete checkpoints, oldest first."""
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        m = _STEP_DIR.match(name)
        path = os.path.join(directory, name)
        if m and os.path.exists(os.path.join(path, META)):
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_checkpoint(directory: str) -> Optional[tuple[int, str]]:
    """The newest complete checkpoint, or None."""
    found = complete_checkpoints(directory)
    return found[-1] if found else None


def rng_state() -> dict:
    return {"python": random.getstate(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _world() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointManager:
    """Save and restore training state under ``directory`` (collective calls: every rank)."""

    def __init__(self, directory: str, keep_last: int = 2):
        self.directory = directory
        self.keep_last = keep_last

    def remove_incomplete(self) -> None:
        """Delete saves that were interrupted (rank 0), so they cannot be mistaken for data."""
        if _rank() == 0 and os.path.isdir(self.directory):
            for name in os.listdir(self.directory):
                if name.startswith(".tmp-"):
                    log.warning("removing interrupted checkpoint %s", name)
                    shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
        _barrier()

    def save(self, step: int, sharded_state: dict, trainer_state: dict,
             meta: Optional[dict] = None) -> str:
        """Write a checkpoint of ``step``; returns its final path.

        ``sharded_state``: Megatron sharded state dict (model and optimizer) for
        ``dist_checkpointing.save``; ``trainer_state``: picklable objects kept by rank 0."""
        from megatron.core import dist_checkpointing

        final = os.path.join(self.directory, step_dir_name(step))
        tmp = os.path.join(self.directory, ".tmp-" + step_dir_name(step))
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        _barrier()
        dist_checkpointing.save(sharded_state, tmp)
        os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
        torch.save(rng_state(), os.path.join(tmp, "rng", f"rank_{_rank():05d}.pt"))
        if _rank() == 0:
            torch.save(trainer_state, os.path.join(tmp, "trainer_state.pt"))
        failpoint("checkpoint_before_commit", step)  # every shard written, not yet renamed
        _barrier()
        if _rank() == 0:
            with open(os.path.join(tmp, META), "w") as f:
                json.dump({"step": step, "world_size": _world(), **(meta or {})}, f)
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(tmp)
            if os.path.exists(final):  # a re-save of the same step after a resume
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(self.directory)
            self._prune()
        _barrier()
        return final

    def _prune(self) -> None:
        found = complete_checkpoints(self.directory)
        for _, path in found[:-self.keep_last]:
            shutil.rmtree(path, ignore_errors=True)

    def load(self, path: str, sharded_state: dict) -> tuple[dict, dict]:
        """Load ``path`` into the layout described by ``sharded_state`` (from
        ``is_loading=True`` state dicts). Returns (loaded sharded state, trainer state); this
        rank's RNG is restored when the world size matches the saving run."""
        from megatron.core import dist_checkpointing

        loaded = dist_checkpointing.load(sharded_state, path)
        trainer_state = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False)
        with open(os.path.join(path, META)) as f:
            meta = json.load(f)
        rng_path = os.path.join(path, "rng", f"rank_{_rank():05d}.pt")
        if meta.get("world_size") == _world() and os.path.exists(rng_path):
            set_rng_state(torch.load(rng_path, weights_only=False))
        elif _rank() == 0:
            log.warning("%s was written by %s ranks, this run has %d: RNG states not restored",
                        path, meta.get("world_size"), _world())
        return loaded, trainer_state


def read_meta(path: str) -> dict[str, Any]:
    with open(os.path.join(path, META)) as f:
        return json.load(f)
