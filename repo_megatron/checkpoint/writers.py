"""Megatron's checkpoint writer processes die with the trainer.

``dist_checkpointing`` (torch_dist) writes through helper processes, even when it saves
synchronously: it forks one writer per file it writes, and the async save forks a process that
forks those writers; the write results come back through a ``multiprocessing`` Manager, a
spawned server process that megatron starts once and never supervises. After a ``kill -9`` of
the trainer that server (and any writer still running) lives on: one was seen 13 minutes later
holding 500 MB.

Inside :func:`reaped_writers`, every process forked by this process (and by its forks) asks
the kernel to SIGKILL it when its parent dies (Linux ``PR_SET_PDEATHSIG``; elsewhere a watcher
thread polls the parent), and megatron's results queue lives in a Manager that does the same.
A killed trainer therefore leaves no process behind, whatever moment it died at. The save is
incomplete then anyway: it is a ``.tmp-`` directory that the next start removes.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from multiprocessing.managers import SyncManager
from typing import Iterator, Optional

from ..runtime.failpoints import failpoint

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1

_saving_step: Optional[int] = None   # set while a save may fork writers (inherited by forks)
_forking_parent = 0                  # pid of the process that is forking, for the child
_manager: Optional[SyncManager] = None


def die_with_parent(parent_pid: int) -> None:
    """Make the kernel SIGKILL this process when ``parent_pid`` (its parent) exits; exit at
    once if the parent is already gone (it may die between the fork and this call)."""
    libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
    if libc is None or libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    if os.getppid() != parent_pid:
        os._exit(1)


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(1)


def _before_fork() -> None:
    global _forking_parent
    _forking_parent = os.getpid()


def _after_fork_in_child() -> None:
    if _saving_step is not None:
        die_with_parent(_forking_parent)


def _after_fork_in_parent() -> None:
    if _saving_step is not None:
        failpoint("checkpoint_writer_forked", _saving_step)  # tests: kill -9 mid-write


os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child,
                    after_in_parent=_after_fork_in_parent)


def _install_results_queue() -> None:
    """Give megatron's writers a results queue served by a Manager that dies with us."""
    global _manager
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async
    except ImportError:
        return
    if _manager is not None or not hasattr(filesystem_async, "_results_queue"):
        return
    _manager = SyncManager(ctx=mp.get_context("spawn"))
    _manager.start(initializer=die_with_parent, initargs=(os.getpid(),))
    filesystem_async._results_queue = _manager.Queue()


@contextlib.contextmanager
def reaped_writers(step: int) -> Iterator[None]:
    """Within this block, checkpoint writer processes die when this process dies."""
    global _saving_step
    _install_results_queue()
    _saving_step = step
    try:
        yield
    finally:
        _saving_step = None


def shutdown() -> None:
    """Stop the results-queue Manager (at the end of a run; the next save starts another)."""
    global _manager
    if _manager is None:
        return
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    filesystem_async._results_queue = None
    _manager.shutdown()
    _manager = None
