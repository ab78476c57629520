"""Training checkpoints: atomic, self-verifying, resumable, pruned to the last K.

Layout of ``CHECKPOINT_DIR``::

    step_000012/            a complete checkpoint (renamed into place as the last act)
      (torch_dist files)    model + optimizer, sharded: loads in any TP/PP/DP layout
      trainer_state.pt      step, scheduler, data position, replay buffer... (plain data)
      rng/rank_00003.pt     each rank's RNG states (plain data)
      meta.json             step, layout and the manifest (size and SHA-256 of every other
                            file, hashed from disk by all ranks, each the files it wrote):
                            written last
    step_000011.corrupt/    failed verification on a resume: set aside, never loaded or pruned
    .tmp-step_000013/       a save in progress (or killed mid-save): ignored, removed at start

A checkpoint exists under its final name only once every rank finished writing and its
manifest is in ``meta.json``, so a run killed at any moment resumes from the newest complete
one. On resume a checkpoint is trusted only after its manifest checks out and it loads with
``weights_only`` unpickling; otherwise the next older one is tried, with a warning.
Pruning runs only after a new checkpoint has been committed and re-checked, and never removes
it, so the newest verified checkpoint always survives.

With ``async_save`` the torch_dist files are written in the background by megatron's async
dist-checkpointing; :meth:`CheckpointManager.poll` (every step) finalises a finished write and
only then hashes, commits and renames it.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import time
from functools import partial
from typing import Any, Callable, Optional

import torch
from torch.distributed.checkpoint.api import CheckpointException

from ..runtime import control
from ..runtime.failpoints import failpoint
from ..runtime.fs import fsync_path
from . import writers
from ..errors import CheckpointError
from .manifest import build_entries, check_entries, hash_shares, list_files, unlisted_files
from .model_io import load_sharded_state
from .plain import check_plain, load_plain
from .rng import rng_state, set_rng_state

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d+)$")
META = "meta.json"
TRAINER_STATE = "trainer_state.pt"
FORMAT = 2  # 2: meta.json carries the manifest
_DISK_FULL_BYTES = 64 << 20  # less free space than this after a failed write: the disk was full
# torch.distributed.checkpoint raises CheckpointException, a BaseException, for rank failures
FAILURES = (Exception, CheckpointException)


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


def read_meta(path: str) -> dict[str, Any]:
    with open(os.path.join(path, META)) as f:
        return json.load(f)


def one_line(error: BaseException) -> str:
    """``Type: first line of the message`` (at most 300 characters)."""
    text = (str(error).strip().splitlines() or [""])[0]
    text = text if len(text) <= 300 else text[:297] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def load_failure(error: BaseException) -> str:
    """Why a checkpoint could not be loaded, in one line; a pickle that ``weights_only``
    unpickling refused says which global it tried to load."""
    text = str(error)
    if "Weights only load failed" in text:
        found = re.search(r"GLOBAL ([\w.]+)", text)
        what = found.group(1) if found else "an object that is not plain data"
        return (f"refused: it unpickles {what} (only tensors and plain data are loaded; "
                "a checkpoint from elsewhere?)")
    return one_line(error)


def is_disk_full(error: BaseException, directory: str) -> bool:
    """Whether a failed write failed for lack of space: ENOSPC anywhere in the exception chain
    (megatron's writer processes pass it on only as text), or next to no space left (torch's
    zip writer reports a full disk as "unexpected pos ...")."""
    seen = set()
    e: Optional[BaseException] = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if getattr(e, "errno", None) == errno.ENOSPC or os.strerror(errno.ENOSPC) in str(e):
            return True
        e = e.__cause__ or e.__context__
    return free_bytes(directory) < _DISK_FULL_BYTES


def free_bytes(directory: str) -> int:
    """Bytes an unprivileged writer can still use on ``directory``'s file system."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return 1 << 62
    return st.f_bavail * st.f_frsize


def _rank() -> int:
    return torch.distributed.get_rank()


def _world() -> int:
    return torch.distributed.get_world_size()


def _layout() -> dict:
    """World size and TP x PP x DP: RNG states are restored only into the same layout."""
    layout = {"world_size": _world()}
    try:
        from megatron.core import parallel_state as ps
        if ps.model_parallel_is_initialized():
            layout.update(tp=ps.get_tensor_model_parallel_world_size(),
                          pp=ps.get_pipeline_model_parallel_world_size(),
                          dp=ps.get_data_parallel_world_size())
    except ImportError:
        pass
    return layout


def _async_strategy(save) -> dict:
    """megatron-core's own async writer: from 0.19 ``dist_checkpointing.save`` defaults to
    ``async_strategy="nvrx"``, which needs nvidia-resiliency-ext (not a dependency of ours);
    earlier releases have only megatron's own (no such argument)."""
    import inspect

    return ({"async_strategy": "mcore"}
            if "async_strategy" in inspect.signature(save).parameters else {})


def _write_json(path: str, data: dict) -> None:
    """Atomically: written aside, flushed to disk, renamed."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)


def manifest_problem(manifest: Any) -> Optional[str]:
    """What is wrong with a manifest read from ``meta.json`` (None if it is well-formed):
    entries ``{relative path: {"size": int, "sha256": hex}}`` that stay inside the checkpoint."""
    if not isinstance(manifest, dict) or not manifest:
        return f"{META} has no manifest (written before checkpoints carried one?)"
    for name, entry in manifest.items():
        inside = (isinstance(name, str) and name and not os.path.isabs(name)
                  and ".." not in name.split("/") and name != META)
        if not inside:
            return f"{META} lists {str(name)[:80]!r}, which is not a file of the checkpoint"
        if not (isinstance(entry, dict) and type(entry.get("size")) is int
                and isinstance(entry.get("sha256"), str)):
            return f"{META}: the manifest entry of {name} is malformed"
    return None


class CheckpointManager:
    """Save and restore training state under ``directory`` (collective calls: every rank). The
    ranks agree, and wait while others hash their share of a checkpoint, on the control plane
    (:mod:`repo_megatron.runtime.control`: gloo, ``parallel.control_timeout_minutes``).

    ``keep_last``: complete checkpoints kept; ``async_save``: write the torch_dist files in
    the background (megatron's async dist-checkpointing); ``verify_checksums``: check every
    file's SHA-256 on resume (sizes are always checked)."""

    def __init__(self, directory: str, keep_last: int = 2, async_save: bool = False,
                 verify_checksums: bool = True):
        self.directory = directory
        self.keep_last = keep_last
        self.async_save = async_save
        self.verify_checksums = verify_checksums
        self._async_queue = None  # megatron AsyncCallsQueue, created by the first async save
        self._pending: Optional[tuple[int, str]] = None  # (step, tmp dir) being written

    # ---- saving ------------------------------------------------------------------------------

    def remove_incomplete(self) -> None:
        """Delete saves that were interrupted (rank 0), so they cannot be mistaken for data."""
        if _rank() == 0 and os.path.isdir(self.directory):
            for name in os.listdir(self.directory):
                if name.startswith(".tmp-"):
                    log.warning("removing interrupted checkpoint %s", name)
                    shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
        control.barrier()

    def save(self, step: int, sharded_state: dict, trainer_state: dict,
             meta: Optional[dict] = None) -> str:
        """Write a checkpoint of ``step``; returns its final path (with ``async_save`` it
        appears there once :meth:`poll` or :meth:`wait` has committed it).

        ``sharded_state``: Megatron sharded state dict (model and optimizer) for
        ``dist_checkpointing.save``; ``trainer_state``: plain data kept by rank 0.
        Raises :class:`CheckpointError` on every rank (a full disk says so); the previous
        checkpoints are left as they were."""
        from megatron.core import dist_checkpointing

        self.wait()  # one save in flight at a time
        final = os.path.join(self.directory, step_dir_name(step))
        tmp = os.path.join(self.directory, ".tmp-" + step_dir_name(step))
        self._guard(step, tmp, lambda: check_plain(trainer_state) if _rank() == 0 else None)
        self._guard(step, tmp, lambda: self._make_tmp(tmp))
        with writers.reaped_writers(step):
            try:
                request = dist_checkpointing.save(sharded_state, tmp,
                                                  async_sharded_save=self.async_save,
                                                  **_async_strategy(dist_checkpointing.save))
            except FAILURES as e:
                raise self._write_failed(step, tmp, e) from e
            self._guard(step, tmp, lambda: self._write_trainer_files(tmp, trainer_state))
            commit = partial(self._commit, step, tmp, final, meta or {})
            if request is None:
                commit()
                return final
            from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
            request.add_finalize_fn(commit)
            self._async_queue = self._async_queue or AsyncCallsQueue()
            self._pending = (step, tmp)
            self._async_queue.schedule_async_request(request)
        return final

    def _make_tmp(self, tmp: str) -> None:
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)

    def _write_trainer_files(self, tmp: str, trainer_state: dict) -> None:
        os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
        torch.save(rng_state(), os.path.join(tmp, "rng", f"rank_{_rank():05d}.pt"))
        if _rank() == 0:
            torch.save(trainer_state, os.path.join(tmp, TRAINER_STATE))

    def _guard(self, step: int, tmp: str, fn: Callable[[], Any], only_rank0: bool = False) -> None:
        """Run ``fn`` on every rank (or rank 0); if it failed anywhere, every rank raises the
        same :class:`CheckpointError` and the partial save is removed."""
        message = None
        if not only_rank0 or _rank() == 0:
            try:
                fn()
            except FAILURES as e:
                message = self._failure_message(step, e)
        message = (control.broadcast_object(message) if only_rank0
                   else control.first_problem(message))
        if message is not None:
            self._abandon(tmp)
            raise CheckpointError(message)

    def _commit(self, step: int, tmp: str, final: str, meta: dict) -> None:
        """Every rank's files are written: hash them (each rank the files it wrote, while they
        are in its page cache, and a share of the rest), write ``meta.json`` with the
        manifest, rename into place, re-check and prune (collective)."""
        start = time.perf_counter()
        failpoint("checkpoint_before_commit", step)  # every shard written, not yet committed
        control.barrier()
        sizes = control.broadcast_object({name: os.path.getsize(os.path.join(tmp, name))
                                          for name in list_files(tmp)} if _rank() == 0 else None)
        mine = hash_shares(sizes, _world(), own_files=True)[_rank()]
        entries: list = []
        self._guard(step, tmp, lambda: entries.append(build_entries(tmp, mine)))
        manifest = {k: v for part in control.all_gather_object(entries[0])
                    for k, v in part.items()}
        self._guard(step, tmp, lambda: self._publish(step, tmp, final, meta, manifest),
                    only_rank0=True)
        self._pending = None
        if _rank() == 0:
            log.info("Saved checkpoint %s (%d files, %.1f MB; manifest %.1f s)", final,
                     len(manifest), sum(e["size"] for e in manifest.values()) / 1e6,
                     time.perf_counter() - start)

    def _publish(self, step: int, tmp: str, final: str, meta: dict, manifest: dict) -> None:
        """Rank 0: ``meta.json`` with the manifest, the atomic rename, a re-check, pruning."""
        _write_json(os.path.join(tmp, META), {"format": FORMAT, "step": step, "layout": _layout(),
                                               **meta, "manifest": manifest})
        fsync_path(tmp)
        replaced = final + ".replaced"
        if os.path.exists(final):  # a re-save of the same step after a resume
            shutil.rmtree(replaced, ignore_errors=True)
            os.rename(final, replaced)
        os.rename(tmp, final)
        fsync_path(self.directory)
        shutil.rmtree(replaced, ignore_errors=True)
        problems = check_entries(final, manifest, checksums=False)
        if problems:
            raise CheckpointError(f"{final} changed right after it was written: "
                                  + "; ".join(problems[:3]))
        self._prune(keep=final)

    def _failure_message(self, step: int, error: BaseException) -> str:
        """What to tell the user about a failed save of ``step`` (a full disk says so)."""
        name = step_dir_name(step)
        kept = [os.path.basename(p) for _, p in complete_checkpoints(self.directory)]
        kept_text = f"kept: {', '.join(kept)}" if kept else "no earlier checkpoint"
        if is_disk_full(error, self.directory):
            return (f"no space left on device while saving checkpoint {name} to "
                    f"{self.directory} ({free_bytes(self.directory) >> 20} MB free; {kept_text})")
        return f"saving checkpoint {name} to {self.directory} failed: {one_line(error)} ({kept_text})"

    def _write_failed(self, step: int, tmp: str, error: BaseException) -> CheckpointError:
        """The error for a failed torch_dist write, after removing the partial save. A failed
        shard write raises CheckpointException on every rank, with the details only on the
        coordinator (rank 0): the ranks then agree on the most telling message."""
        message = self._failure_message(step, error)
        collective = isinstance(error, CheckpointException)
        if collective:
            messages = control.all_gather_object(message)
            message = next((m for m in messages if m.startswith("no space")), messages[0])
        self._abandon(tmp, collective)
        return CheckpointError(message)

    def _abandon(self, tmp: str, collective: bool = True) -> None:
        """Remove a failed save's partial files (rank 0; ``collective``: every rank is here
        and waits for it)."""
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        self._pending = None
        if collective:
            control.barrier()

    def poll(self) -> None:
        """Commit a background save whose files are all written (collective; no-op when
        nothing is pending)."""
        self._finalize(blocking=False)

    def wait(self) -> None:
        """Block until a background save is committed (collective)."""
        self._finalize(blocking=True)

    def _finalize(self, blocking: bool) -> None:
        if self._async_queue is None or not self._async_queue.get_num_unfinalized_calls():
            return
        step, tmp = self._pending
        try:
            self._async_queue.maybe_finalize_async_calls(blocking=blocking)
        except CheckpointError:
            raise
        except FAILURES as e:
            raise self._write_failed(step, tmp, e) from e

    def close(self) -> None:
        """Commit a pending background save and stop the writers' helper process."""
        try:
            self.wait()
        finally:
            writers.shutdown()

    def _prune(self, keep: str) -> None:
        found = complete_checkpoints(self.directory)
        for _, path in found[:-self.keep_last]:
            if path != keep:
                shutil.rmtree(path, ignore_errors=True)

    # ---- resuming ------------------------------------------------------------------------------

    def verify(self, path: str) -> Optional[str]:
        """Why ``path`` cannot be trusted (None if its manifest checks out). Collective: each
        rank checks a share of the files."""
        problem = None
        manifest: dict = {}
        try:
            meta = read_meta(path)
        except (OSError, ValueError, RecursionError) as e:
            meta, problem = None, f"{META} cannot be read ({one_line(e)})"
        if problem is None:
            manifest = meta.get("manifest") if isinstance(meta, dict) else None
            problem = manifest_problem(manifest)
        problem = control.first_problem(problem)
        if problem is None:
            mine = hash_shares({n: e["size"] for n, e in manifest.items()}, _world(),
                               own_files=False)[_rank()]
            found = check_entries(path, {n: manifest[n] for n in mine},
                                  checksums=self.verify_checksums)
            if _rank() == 0:
                found += [f"{n} is not in the manifest"
                          for n in unlisted_files(path, manifest, exempt=[META])]
            problem = control.first_problem("; ".join(found[:3]) if found else None)
        return problem

    def load(self, path: str, sharded_state: dict) -> tuple[dict, dict]:
        """Load ``path`` into the layout described by ``sharded_state`` (from
        ``is_loading=True`` state dicts). Returns (loaded sharded state, trainer state); this
        rank's RNG is restored when the layout matches the saving run's. Every pickle in the
        checkpoint is read with ``weights_only``: one that names code is refused. Keys are
        checked as :func:`~.model_io.load_sharded_state` checks them."""
        loaded = load_sharded_state(sharded_state, path)
        trainer_state = load_plain(os.path.join(path, TRAINER_STATE))
        meta = read_meta(path)
        rng_path = os.path.join(path, "rng", f"rank_{_rank():05d}.pt")
        if meta.get("layout") == _layout() and os.path.exists(rng_path):
            set_rng_state(load_plain(rng_path))
        elif _rank() == 0:
            log.warning("%s was written in layout %s, this run is %s: RNG states not restored",
                        path, meta.get("layout"), _layout())
        return loaded, trainer_state

    def load_newest_intact(self, sharded_state: Callable[[], dict]
                           ) -> Optional[tuple[int, str, dict, dict]]:
        """``(step, path, loaded state, trainer state)`` of the newest checkpoint that verifies
        and loads (collective); None when there is no complete checkpoint at all.

        ``sharded_state()`` builds a fresh loading state dict for each attempt. A checkpoint
        that fails verification is renamed ``step_N.corrupt`` (kept for inspection) and the
        next older one is tried, with a warning. Raises :class:`CheckpointError` naming every
        checkpoint's problem when none is intact."""
        self.wait()
        found = complete_checkpoints(self.directory)
        if not found:
            return None
        problems = []
        for step, path in reversed(found):
            problem = self.verify(path)
            corrupt = problem is not None
            if problem is None:
                try:
                    loaded, trainer_state = self.load(path, sharded_state())
                except FAILURES as e:  # a refused pickle, an unreadable shard...
                    problem = f"cannot be loaded: {load_failure(e)}"
                problem = control.first_problem(problem)
            if problem is None:
                if problems and _rank() == 0:
                    log.warning("resuming from %s, the newest intact checkpoint", path)
                return step, path, loaded, trainer_state
            if corrupt:
                self._set_aside(path)
            problems.append(f"{os.path.basename(path)}: {problem}")
            if _rank() == 0:
                log.warning("checkpoint %s is not intact: %s; %s", path, problem,
                            "set aside as .corrupt" if corrupt else "skipped")
        raise CheckpointError(f"no intact checkpoint in {self.directory} to resume from: "
                              + " | ".join(problems))

    def _set_aside(self, path: str) -> None:
        if _rank() == 0:
            target, n = path + ".corrupt", 1
            while os.path.exists(target):
                n += 1
                target = f"{path}.corrupt-{n}"
            os.rename(path, target)
        control.barrier()
