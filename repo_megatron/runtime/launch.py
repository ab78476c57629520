"""Run a function under N local processes, as torchrun would, with a hard timeout.

``run_distributed(fn, world_size, *args)`` spawns ``world_size`` processes with the torchrun
environment set, calls ``fn(*args)`` in each and returns the per-rank results. A rank that
raises fails the call with its traceback (:class:`DistributedRunError`); a hang fails it after
``timeout`` seconds with every rank's stack dumped by faulthandler. Used by the tests (each
launch costs 7-15 s of imports on 2 cores: group several checks per launch) and by
``repo-megatron train --dry-run``.
"""

from __future__ import annotations

import faulthandler
import multiprocessing as mp
import os
import pickle
import queue
import sys
import time
import traceback
from typing import Any, Callable, Sequence

from .ports import free_port


class DistributedRunError(AssertionError):
    """A rank raised, died or hung (an AssertionError so pytest reports it as a failure)."""


def _child(fn: Callable, args: tuple, rank: int, world_size: int, port: int, timeout: float,
           results: "mp.Queue") -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    faulthandler.dump_traceback_later(timeout, exit=True)
    try:
        import torch
        torch.set_num_threads(1)
        value = fn(*args)
        # By value: through the queue torch would share tensors by file descriptor, which
        # dies with this process when it exits before the parent has read the result.
        results.put((rank, "ok", pickle.dumps(value)))
    except BaseException:  # noqa: BLE001 - report everything to the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            from repo_megatron.runtime.distributed import teardown
            teardown()
        except Exception:
            pass
        sys.stdout.flush()
        sys.stderr.flush()


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = 300,
                    preload: Sequence[str] = ()) -> list:
    """``[fn(*args) on rank 0, ..., on rank world_size - 1]``; raises on any failure.

    Ranks are spawned (a fresh interpreter each) unless ``preload`` names modules: then they
    are forked from a fork server that imported those modules once, so the ranks share their
    memory pages and skip the imports (what makes 32 or 64 ranks fit on a laptop)."""
    if preload:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(list(preload))
    else:
        ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(fn, args, r, world_size, port, timeout, results),
                         daemon=False) for r in range(world_size)]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    errors = []
    deadline = time.monotonic() + timeout + 30
    try:
        while len(out) < world_size and not errors:
            try:
                rank, status, value = results.get(timeout=1.0)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs)
                        if r not in out and p.exitcode not in (None, 0)]
                if dead:  # crashed (or faulthandler's timeout fired) without reporting
                    errors.append(f"rank {dead[0]}: exited with code {procs[dead[0]].exitcode} "
                                  "(see captured stderr)")
                elif time.monotonic() > deadline:
                    errors.append(f"timed out after {timeout}s (stack dumps of hung ranks are "
                                  "in the captured stderr)")
                continue
            if status == "ok":
                out[rank] = pickle.loads(value)  # our own child, through its pipe: trusted
            else:
                errors.append(f"rank {rank}:\n{value}")
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.5)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise DistributedRunError(f"distributed run of {fn.__name__} failed on " + errors[0])
    return [out[r] for r in range(world_size)]
