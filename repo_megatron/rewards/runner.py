"""Scoring in worker processes with a hard per-call timeout.

``concurrent.futures`` cannot stop one hung call, so this keeps its own small pool: each worker
is a process holding one pipe and scoring one request at a time. A call past its deadline gets
its worker killed and replaced, and that sample alone is marked failed; the step goes on.
Workers are spawned (not forked) because the trainer process holds threads and a model.

Every result is checked in the trainer (:func:`~.base.bounded`): a non-finite or out-of-range
value becomes a failed reward. Failures are logged with their reason, at most once a minute
per kind of failure, with a count of those not shown.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import time
from collections import Counter, deque
from multiprocessing.connection import Connection, wait
from typing import Callable, Optional, Sequence

from .base import RewardRequest, RewardResult, bounded, call_reward, resolve_reward

log = logging.getLogger(__name__)


_START_TIMEOUT_S = 120.0


def _worker_main(reward: str, conn: Connection) -> None:
    """Worker loop: say it is ready, then score requests from ``conn`` until it sends None."""
    try:
        fn = resolve_reward(reward)
        getattr(fn, "warm_up", lambda: None)()  # heavy imports before the first timed call
    except Exception as e:
        conn.send(f"{type(e).__name__}: {e}")
        return
    conn.send("ready")
    while True:
        request = conn.recv()
        if request is None:
            return
        conn.send(call_reward(fn, request))


class _Worker:
    def __init__(self, ctx, reward: str):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(reward, child), daemon=True)
        self.process.start()
        child.close()
        self.reward = reward
        self.task: Optional[int] = None       # index of the request being scored
        self.deadline = 0.0

    def wait_ready(self) -> "_Worker":
        """Block until the worker has imported the reward (start-up never counts against a
        call's timeout)."""
        status = self.conn.recv() if self.conn.poll(_START_TIMEOUT_S) else "no answer"
        if status != "ready":
            self.kill()
            raise RuntimeError(f"reward worker for {self.reward} did not start: {status}")
        return self

    def kill(self) -> None:
        self.process.kill()
        self.process.join()
        self.conn.close()


class RateLimitedLog:
    """Warnings keyed by kind: the first of a kind is logged at once, later ones at most
    every ``interval_s`` seconds, saying how many were not shown in between."""

    def __init__(self, logger: logging.Logger, interval_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic):
        self.logger, self.interval_s, self.clock = logger, interval_s, clock
        self._last: dict[str, float] = {}
        self._suppressed: Counter = Counter()

    def warn(self, kind: str, message: str, count: int = 1) -> bool:
        """Log ``message`` unless ``kind`` was logged less than ``interval_s`` ago (then only
        count it). ``count``: how many occurrences the message stands for. Returns whether
        it was logged."""
        now = self.clock()
        last = self._last.get(kind)
        if last is not None and now - last < self.interval_s:
            self._suppressed[kind] += count
            return False
        hidden = self._suppressed.pop(kind, 0)
        suffix = f" (+{hidden} like it since the last report)" if hidden else ""
        self.logger.warning("%s%s", message, suffix)
        self._last[kind] = now
        return True


def failure_kind(reason: str) -> str:
    """What kind of failure a reason describes: its text up to the first ':'."""
    return reason.split(":", 1)[0][:80]


class RewardRunner:
    """Scores :class:`RewardRequest` lists with reward ``reward`` (registered name or
    ``module:function``) in ``num_workers`` processes, ``timeout_s`` per call; a value that
    is not a finite number within ``+-max_abs`` is a failed reward."""

    def __init__(self, reward: str, timeout_s: float = 10.0, num_workers: int = 2,
                 max_abs: float = 1e6):
        resolve_reward(reward)                # a bad name fails here, in the trainer
        self.reward = reward
        self.timeout_s = timeout_s
        self.max_abs = max_abs
        self.failures = RateLimitedLog(log)
        self._ctx = mp.get_context("spawn")
        # The workers import the reward while the caller goes on (the trainer builds its
        # engine meanwhile); the first score() waits until they are ready.
        self._workers = [_Worker(self._ctx, reward) for _ in range(num_workers)]
        self._started = False

    def score(self, requests: Sequence[RewardRequest]) -> list[RewardResult]:
        """One result per request, in order. Raising, hanging or crashing rewards give
        ``RewardResult(0, reason, failed=True)`` for that request only."""
        if not self._started:
            for worker in self._workers:
                worker.wait_ready()
            self._started = True
        results: list[Optional[RewardResult]] = [None] * len(requests)
        pending = deque(range(len(requests)))
        while pending or any(w.task is not None for w in self._workers):
            for worker in self._workers:
                if worker.task is None and pending:
                    worker.task = pending.popleft()
                    # the clock starts when a worker takes the call, not when it was queued
                    worker.deadline = time.monotonic() + self.timeout_s
                    worker.conn.send(requests[worker.task])
            busy = [w for w in self._workers if w.task is not None]
            wait([w.conn for w in busy], timeout=max(0.0, min(w.deadline for w in busy) - time.monotonic()))
            for i, worker in enumerate(self._workers):
                if worker.task is None:
                    continue
                result, dead = self._collect(worker)
                if result is not None:
                    results[worker.task] = bounded(result, self.max_abs)
                    worker.task = None
                if dead:
                    self._workers[i] = _Worker(self._ctx, self.reward).wait_ready()
        self._log_failures(results)  # type: ignore[arg-type]
        return results  # type: ignore[return-value]

    def _log_failures(self, results: Sequence[RewardResult]) -> None:
        by_kind: dict[str, list[str]] = {}
        for r in results:
            if r.failed:
                by_kind.setdefault(failure_kind(r.reason), []).append(r.reason)
        for kind, reasons in by_kind.items():
            example = reasons[0] if len(reasons[0]) <= 300 else reasons[0][:297] + "..."
            self.failures.warn(kind, f"reward {self.reward} failed for {len(reasons)} of "
                                     f"{len(results)} samples: {example}", count=len(reasons))

    def _collect(self, worker: _Worker) -> tuple[Optional[RewardResult], bool]:
        """(the worker's result, a failure if it died or overran, or None while it is busy;
        whether the worker was killed and must be replaced)."""
        if worker.conn.poll():
            try:
                return worker.conn.recv(), False
            except (EOFError, OSError):
                pass  # the pipe closed: the worker died mid-call
        elif worker.process.is_alive():
            if time.monotonic() < worker.deadline:
                return None, False
            worker.kill()
            return RewardResult(0.0, f"reward timed out after {self.timeout_s:g} s", failed=True), True
        worker.kill()
        return RewardResult(0.0, f"reward worker died (exit code {worker.process.exitcode})",
                            failed=True), True

    def close(self) -> None:
        """Stop the workers."""
        for worker in self._workers:
            if worker.process.is_alive():
                try:
                    worker.conn.send(None)
                except OSError:
                    pass
                worker.process.join(timeout=1.0)
            worker.kill()
        self._workers = []

    def __enter__(self) -> "RewardRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
