"""The CPU engine behind ``repo-megatron serve``: dynamic batching, pause/continue, abort,
and weight updates, all serialised on one engine thread.

Requests that arrive while a batch runs wait in a queue and form the next batch, as in
SGLang's scheduler; each request keeps its own seed, so batching does not change its sample
(up to float rounding of the padded batch). Weight updates run on the same thread, so they
never overlap a forward pass.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Optional

from ..rollout.engine import SamplingParams
from ..rollout.hf_engine import HFEngine

log = logging.getLogger(__name__)

BATCH_WINDOW_S = 0.01


@dataclass
class Request:
    """One ``/generate`` request waiting for (or in) a batch."""
    rid: str
    input_ids: list[int]
    params: SamplingParams
    done: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class EngineWorker:
    """Owns the :class:`HFEngine` once ``load()`` has built it (``status`` goes from
    ``starting`` to ``up``)."""

    def __init__(self, load: Callable[[], HFEngine], batch_size: int = 64):
        self.load, self.batch_size = load, batch_size
        self.engine: Optional[HFEngine] = None
        self.status = "starting"
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self.queue: list[Request] = []
        self.running: list[Request] = []
        self.paused = False
        self._wake: Optional[asyncio.Event] = None
        self._idle: Optional[asyncio.Event] = None
        self._batcher: Optional[asyncio.Task] = None

    async def start(self) -> None:
        """Load the model on the engine thread, then start batching."""
        self._wake, self._idle = asyncio.Event(), asyncio.Event()
        self._idle.set()
        try:
            self.engine = await self.on_engine_thread(self.load)
        except Exception:
            self.status = "failed"
            log.exception("loading the model failed")
            raise
        self.status = "up"
        self._batcher = asyncio.create_task(self._batch_loop())

    async def stop(self) -> None:
        if self._batcher is not None:
            self._batcher.cancel()
        self.abort_all("server shutting down")
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def on_engine_thread(self, fn, *args):
        """Run ``fn(*args)`` on the engine thread (after the batch in progress)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    @property
    def busy(self) -> bool:
        """Requests running, or waiting while generation is not paused (SGLang refuses a
        cache flush then)."""
        return bool(self.running) or (bool(self.queue) and not self.paused)

    async def generate(self, requests: list[Request]) -> list[object]:
        """Queue ``requests``; each resolves to a :class:`GenerationResult` or, if aborted,
        to the abort message (a str)."""
        self.queue.extend(requests)
        self._wake.set()
        return list(await asyncio.gather(*(r.done for r in requests)))

    def abort(self, rid: Optional[str] = None, message: str = "Abort requested") -> None:
        """Finish queued and running requests (all, or the one with ``rid``) as aborted."""
        for request in self.queue + self.running:
            if (rid is None or request.rid == rid) and not request.done.done():
                request.done.set_result(message)
        self.queue = [r for r in self.queue if not r.done.done()]

    def abort_all(self, message: str = "Abort requested") -> None:
        self.abort(None, message)

    async def pause(self) -> None:
        """Start no new batch; return once the running one has finished."""
        self.paused = True
        await self._idle.wait()

    def resume(self) -> None:
        self.paused = False
        self._wake.set()

    async def _batch_loop(self) -> None:
        while True:
            await self._wake.wait()
            # requests sent together arrive over many connections: let them join one batch
            await asyncio.sleep(BATCH_WINDOW_S)
            self._wake.clear()
            while self.queue and not self.paused:
                batch, self.queue = self.queue[:self.batch_size], self.queue[self.batch_size:]
                self.running = batch
                self._idle.clear()
                try:
                    results = await self.on_engine_thread(
                        self.engine.generate, [r.input_ids for r in batch],
                        [r.params for r in batch])
                    outcomes: list[object] = list(results)
                except Exception as e:          # reported to each request of the batch
                    log.exception("generation failed")
                    outcomes = [e] * len(batch)
                finally:
                    self.running = []
                    self._idle.set()
                for request, outcome in zip(batch, outcomes):
                    if request.done.done():     # aborted meanwhile
                        continue
                    if isinstance(outcome, Exception):
                        request.done.set_exception(outcome)
                    else:
                        request.done.set_result(outcome)

