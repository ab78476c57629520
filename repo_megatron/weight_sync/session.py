"""The sequence of one weight update around the strategy, on the engine's rank:

    /resume_memory_occupation {"tags": ["weights"]}   (released engines, colocated)
    /pause_generation {"mode"}                         abort | retract | in_place
    /begin_weight_update                               tensor and distributed, on every worker
                                                       that has the endpoint (404: it has not)
    senders: prepare, push(bucket)...                  one per pipeline stage
    strategy.finish                                    e.g. the disk index, then load it
    /end_weight_update                                 where a session was opened
    /flush_cache                                       retried while SGLang refuses (400)
    /update_weight_version {"new_version", "abort_all_requests": false}
    /resume_memory_occupation {"tags": ["kv_cache", "cuda_graph"]}  (released engines whose
                                                       generation_memory_after_update is on)
    /continue_generation                               always, also after a failure

Capability, not version: SGLang 0.5.21 (and forks under older numbers) refuse tensor and
distributed updates outside a session, 0.5.20 has no such endpoints.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Optional, Protocol

from ..config.rollout import SGLangConfig
from ..engines.sglang.client import SGLangError
from ..engines.sglang.protocol import (CUDA_GRAPH_TAG, EMPTY, KV_CACHE_TAG, pause_body,
                                       weight_version_body)
from .base import SyncPlan, SyncTarget
from .sender import StageSender

log = logging.getLogger(__name__)

KV_CACHE_AND_GRAPHS = [KV_CACHE_TAG, CUDA_GRAPH_TAG]


class UpdatableEngine(Protocol):
    """What an update session needs from the engine it updates (the SGLang engine,
    :class:`~repo_megatron.engines.sglang.engine.SGLangEngine`): its workers, its stage-0
    sender, and public methods for the state an update changes."""
    cfg: SGLangConfig
    sender: StageSender               # the sender of pipeline stage 0, on the engine's loop
    tp_sizes: dict[str, int]          # worker URL -> engine TP size
    disk_dir: str                     # disk sync: the directory the workers read
    generation_memory_after_update: bool  # resume the KV cache at the end of an update

    def run(self, coro):
        """Run a coroutine on the engine's loop and wait for its result."""

    async def workers(self) -> list[str]:
        """The worker URLs."""

    def note_pause(self) -> None:
        """Count a ``/pause_generation`` (before it is sent): requests it aborts are retried."""

    async def resume_weights_memory(self, workers: list[str]) -> None:
        """The released weights' memory back (the rest stays released until
        :meth:`resume_memory`)."""

    async def resume_memory(self, tags: Optional[list[str]] = None,
                            workers: Optional[list[str]] = None) -> None:
        """What the engine released back (``tags`` of it, on ``workers``)."""

    def set_weight_version(self, version: int) -> None:
        """The weight version the engine now serves."""


async def open_sessions(target: SyncTarget) -> list[str]:
    """``/begin_weight_update`` on every worker; returns those that opened one (a 404 means
    the worker has no sessions and takes updates without)."""
    async def begin(worker: str) -> bool:
        try:
            await target.client.request(worker, "/begin_weight_update", EMPTY)
        except SGLangError as e:
            if e.status == 404:
                return False
            raise
        return True

    opened = await asyncio.gather(*(begin(w) for w in target.workers))
    return [w for w, ok in zip(target.workers, opened) if ok]


async def begin(engine: UpdatableEngine, target: SyncTarget) -> list[str]:
    """Everything before the first bucket; returns the workers with an open session."""
    cfg = target.plan.cfg
    await engine.resume_weights_memory(target.workers)
    # Counted before the request goes out: a worker may answer its aborted requests before it
    # answers the pause, and every request aborted from here on is retried.
    engine.note_pause()
    await target.post_all("/pause_generation", pause_body(cfg.pause_mode))
    strategy = engine.sender.strategy
    return await open_sessions(target) if strategy.in_session else []


async def finish(engine: UpdatableEngine, target: SyncTarget, stage_results: list,
                 sessions: list[str]) -> None:
    """Everything after the last bucket of every stage (not ``/continue_generation``)."""
    cfg = target.plan.cfg
    await engine.sender.strategy.finish(target, stage_results)
    await close_sessions(target, sessions)
    if cfg.pause_mode != "in_place":     # paused in place, SGLang keeps its KV cache in use
        await asyncio.gather(*(target.client.retry_while_busy(
            w, "/flush_cache", timeout_s=cfg.flush_cache_timeout_s) for w in target.workers))
    await target.post_all("/update_weight_version", weight_version_body(target.plan.version))


async def close_sessions(target: SyncTarget, sessions: list[str]) -> None:
    await asyncio.gather(*(target.client.request(w, "/end_weight_update", EMPTY)
                           for w in sessions))


async def resume(engine: UpdatableEngine, target: SyncTarget) -> None:
    """After success or failure: memory back (unless the engine takes it back at its next
    generation), sessions closed, generation continued."""
    try:
        if engine.generation_memory_after_update:
            await engine.resume_memory(KV_CACHE_AND_GRAPHS, target.workers)
    finally:
        await target.post_all("/continue_generation", EMPTY)


def plan_update(engine: UpdatableEngine, version: int) -> SyncPlan:
    """The plan of an update to ``version`` to the engine's current workers."""
    workers = engine.run(engine.workers())
    return SyncPlan(workers, {w: engine.tp_sizes.get(w, 1) for w in workers}, version,
                    engine.cfg, engine.disk_dir)


class UpdateSession:
    """One update as a context: ``begin`` on entry, ``finish`` (success) and the resumption
    (always) on exit; stage results are added by whoever collects them."""

    def __init__(self, engine: UpdatableEngine, plan: SyncPlan):
        self.engine, self.plan = engine, plan
        self.target = engine.sender.target(plan)
        self.stage_results: list = []
        self.sessions: list[str] = []

    def __enter__(self) -> "UpdateSession":
        try:
            self.sessions = self.engine.run(begin(self.engine, self.target))
        except BaseException:
            self.engine.run(resume(self.engine, self.target))
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        run = self.engine.run
        try:
            if exc_type is None:
                run(finish(self.engine, self.target, self.stage_results, self.sessions))
                self.engine.set_weight_version(self.plan.version)
            elif self.sessions:
                try:
                    run(close_sessions(self.target, self.sessions))
                except SGLangError as e:              # the original failure matters more
                    log.warning("closing the weight update sessions failed: %s", e)
        finally:
            run(resume(self.engine, self.target))
