"""Rank 0's rollouts running ahead of the trainer (``rollout.max_staleness``).

The loop (:mod:`.loop`) takes each step's batch (:meth:`AsyncRollout.rollout`), lets rank 0
start the rollouts of the next ``max_staleness`` steps (:meth:`AsyncRollout.ahead`) and trains
while they run, so that a step costs about max(generation, training) instead of their sum. The
rollouts ahead run one after another on one background thread, the *producer*, which calls
only the wrapped rollout side (prompts, engine, rewards, the RePO stage: sampling, reward,
gate, rephrase round, injection, replay) and never a torch.distributed collective; the main
thread broadcasts finished batches over the control plane, trains, and syncs the weights.

The schedule is fixed, so a resumed run repeats it: the rollout of step ``s`` starts once step
``s - k`` has taken its batch, on the weights the engine serves then (those after step
``s - k - 1``), and runs to its end on them, because whatever reaches the engine from the main
thread (the weight sync, an evaluation, a checkpoint, an export) first waits for the rollouts
in flight (:meth:`AsyncRollout.wait`). So every sample is trained at most k weight versions
after the one that generated it, and each rollout sees the prompt sampler, replay buffer and
gate history that the rollout of the step before left, as in the synchronous loop.

A checkpoint stores the finished rollouts ahead (plain data) with the rollout side's state after
them; a resumed run trains on them first. With ``max_staleness: 0`` nothing runs ahead: each
step's rollout runs in the main thread when the step asks for it (the synchronous loop).
"""

from __future__ import annotations

import queue
import sys
import threading
from concurrent.futures import Future
from typing import Callable, Optional

from ..rollout.types import Group
from ..runtime.failpoints import failpoint
from .rollout_side import RolloutResult, RolloutSide

# Python's GIL switch interval while a producer runs. The trainer's thread drops the GIL in
# every torch op and, with the default 5 ms, waits up to that long to get it back whenever
# the producer is busy in Python (encoding, HTTP, rewards): the convoy effect. Measured on
# this CPU: 64x256 @ 256x256 matmuls ran 8.2x slower beside a busy Python thread at 5 ms,
# 1.7x at 0.5 ms.
PRODUCER_SWITCH_INTERVAL_S = 0.0005


class _Producer:
    """One daemon thread running ``rollout(step)`` for the steps it is given, in order; after
    a failure every later step fails with it (their rollouts would start from a state the
    failed one left half-done)."""

    def __init__(self, rollout: Callable[[int], RolloutResult]):
        self.rollout = rollout
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.failure: Optional[BaseException] = None
        self.switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(min(self.switch_interval, PRODUCER_SWITCH_INTERVAL_S))
        # a daemon: a run that stops on an error does not wait for a rollout it will not use
        self.thread = threading.Thread(target=self._run, name="rollout-ahead", daemon=True)
        self.thread.start()

    def submit(self, step: int) -> "Future[RolloutResult]":
        future: Future = Future()
        self.jobs.put((step, future))
        return future

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            step, future = job
            if not future.set_running_or_notify_cancel():
                continue
            if self.failure is not None:
                future.set_exception(self.failure)
                continue
            try:
                result = self.rollout(step)
                failpoint("rollout_ahead", step)   # sampled, its state moved on, not yet taken
            except BaseException as e:             # handed to the step that takes it
                self.failure = e
                future.set_exception(e)
            else:
                future.set_result(result)

    def close(self) -> None:
        self.jobs.put(None)
        sys.setswitchinterval(self.switch_interval)


class AsyncRollout(RolloutSide):
    """``inner`` (rank 0's rollout side) with the rollouts of up to ``max_staleness`` steps
    ahead on a producer thread; no rollout past ``last_step`` (the run's last) is started."""

    def __init__(self, inner: RolloutSide, max_staleness: int, last_step: int):
        self.inner, self.max_staleness, self.last_step = inner, max_staleness, last_step
        self.pending: dict[int, Future] = {}   # step -> its rollout: queued, running or done
        self.started = 0                       # the last step whose rollout ran or started
        self.producer: Optional[_Producer] = None

    @property
    def engine(self):
        return self.inner.engine

    def rollout(self, step: int) -> RolloutResult:
        """``step``'s groups and metrics: the rollout that ran ahead (waited for), or one run
        now, in this thread."""
        future = self.pending.pop(step, None)
        if future is not None:
            return future.result()
        self.started = max(self.started, step)
        return self.inner.rollout(step)

    def ahead(self, step: int) -> None:
        """Queue the rollouts of the steps after those started, up to ``step +
        max_staleness`` (and the run's last step)."""
        last = min(step + self.max_staleness, self.last_step)
        for s in range(self.started + 1, last + 1):
            if self.producer is None:
                self.producer = _Producer(self.inner.rollout)
            self.pending[s] = self.producer.submit(s)
        self.started = max(self.started, last)

    def wait(self) -> None:
        """Return once every rollout queued ahead has finished (the first failure, in step
        order, is raised)."""
        for step in sorted(self.pending):
            self.pending[step].result()

    def evaluate(self) -> dict:
        self.wait()
        return self.inner.evaluate()

    def state(self) -> dict:
        """The rollout side's state after the rollouts ahead, and their results (plain
        data)."""
        self.wait()
        ahead = []
        for step in sorted(self.pending):
            groups, metrics = self.pending[step].result()
            ahead.append({"step": step, "groups": [g.to_plain() for g in groups],
                          "metrics": dict(metrics)})
        return {**self.inner.state(), "rollouts_ahead": ahead}

    def load_state(self, state: dict) -> None:
        self.inner.load_state(state)
        for entry in state.get("rollouts_ahead") or []:
            done: Future = Future()
            done.set_result(([Group.from_plain(g) for g in entry["groups"]],
                             dict(entry["metrics"])))
            self.pending[entry["step"]] = done
            self.started = max(self.started, entry["step"])

    def export(self, weights: dict, out: str) -> None:
        self.wait()     # the export saves the tokenizer the producer encodes with
        self.inner.export(weights, out)

    def close(self) -> None:
        if self.producer is not None:
            self.producer.close()
        self.inner.close()
