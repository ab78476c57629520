"""The CPU engine behind ``repo-megatron serve``: dynamic batching, pause/continue, abort,
and weight updates, all serialised on one engine thread.

Requests that arrive while a batch runs wait in a queue and form the next batch, as in
SGLang's scheduler; each request keeps its own seed, so batching does not change its sample
(up to float rounding of the padded batch). Weight updates run on the same thread, so they
never overlap a forward pass. An aborted request leaves the batch after its next token; a
batch that fails is retried request by request, so only the request that fails gets the
error. The engine thread is a daemon: stopping the server never waits for a model load.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

from ..base import GenerationResult, SamplingParams
from ..embedded import HFEngine

log = logging.getLogger(__name__)

BATCH_WINDOW_S = 0.01


@dataclass
class Request:
    """One ``/generate`` request waiting for (or in) a batch."""
    rid: str
    input_ids: list[int]
    params: SamplingParams
    done: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    aborted: bool = False       # read by the engine thread after every token


def _resolve(future: asyncio.Future, result=None, error: Optional[BaseException] = None) -> None:
    if not future.done():
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)


class EngineThread:
    """One daemon thread running the engine calls it is given, in order."""

    def __init__(self):
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            loop, future, fn, args = job
            try:
                result = fn(*args)
            except BaseException as e:      # handed to the awaiting coroutine
                loop.call_soon_threadsafe(_resolve, future, None, e)
            else:
                loop.call_soon_threadsafe(_resolve, future, result)

    def submit(self, fn, *args) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.jobs.put((loop, future, fn, args))
        return future

    def close(self) -> None:
        self.jobs.put(None)


class EngineWorker:
    """Owns the :class:`HFEngine` once ``load()`` has built it (``status`` goes from
    ``starting`` to ``up``)."""

    def __init__(self, load: Callable[[], HFEngine], batch_size: int = 64):
        self.load, self.batch_size = load, batch_size
        self.engine: Optional[HFEngine] = None
        self.status = "starting"
        self.engine_thread = EngineThread()
        self.queue: list[Request] = []
        self.running: list[Request] = []
        self.paused = False
        self._wake: Optional[asyncio.Event] = None
        self._idle: Optional[asyncio.Event] = None
        self._batcher: Optional[asyncio.Task] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    async def start(self) -> None:
        """Load the model on the engine thread, then start batching."""
        self._loop = asyncio.get_running_loop()
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

    async def stop(self, grace_s: float = 2.0) -> None:
        """Abort every request, and give the engine ``grace_s`` to finish its current token."""
        self.status = "stopping"
        if self._batcher is not None:
            self._batcher.cancel()
        self.abort_all("server shutting down")
        self.engine_thread.close()
        await asyncio.to_thread(self.engine_thread.thread.join, grace_s)

    def on_engine_thread(self, fn, *args) -> asyncio.Future:
        """Run ``fn(*args)`` on the engine thread (after the batch in progress)."""
        return self.engine_thread.submit(fn, *args)

    @property
    def busy(self) -> bool:
        """Requests running, or waiting while generation is not paused (SGLang refuses a
        cache flush then)."""
        return bool(self.running) or (bool(self.queue) and not self.paused)

    def in_flight(self, rid: str) -> bool:
        return any(r.rid == rid for r in self.queue + self.running)

    async def generate(self, requests: list[Request]) -> list[object]:
        """Queue ``requests``; each resolves to a :class:`GenerationResult`, to the abort
        message (a str) if aborted, or raises the engine's error."""
        for request in requests:
            if request.params.max_new_tokens == 0:      # SGLang: prefill only, no token
                _resolve(request.done, GenerationResult([], "", [], "length",
                                                        self.engine.weight_version))
            else:
                self.queue.append(request)
        self._wake.set()
        return list(await asyncio.gather(*(r.done for r in requests), return_exceptions=True))

    def abort(self, rid: Optional[str] = None, message: str = "Abort requested") -> None:
        """Finish queued and running requests (all, or the one with ``rid``) as aborted;
        running ones leave the engine's batch after their next token."""
        for request in self.queue + self.running:
            if rid is None or request.rid == rid:
                request.aborted = True
                _resolve(request.done, message)
        self.queue = [r for r in self.queue if not r.aborted]

    def abort_all(self, message: str = "Abort requested") -> None:
        self.abort(None, message)

    def abort_all_soon(self, message: str) -> None:
        """:meth:`abort_all` from another thread or a signal handler."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.abort_all, message)

    async def pause(self) -> None:
        """Start no new batch; return once the running one has finished."""
        self.paused = True
        await self._idle.wait()

    def resume(self) -> None:
        self.paused = False
        self._wake.set()

    def _decode(self, batch: list[Request]) -> list[object]:
        """On the engine thread: the batch's results; if it fails, each request alone, so
        an error reaches only the request that causes it."""
        def run(requests: list[Request]) -> list[GenerationResult]:
            return self.engine.generate([r.input_ids for r in requests],
                                        [r.params for r in requests],
                                        cancelled=lambda i: requests[i].aborted)
        try:
            return list(run(batch))
        except Exception as e:
            if len(batch) == 1:
                log.exception("generation failed for request %s", batch[0].rid)
                return [e]
        outcomes: list[object] = []
        for request in batch:
            outcomes += self._decode([request])
        return outcomes

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
                    outcomes = await self.on_engine_thread(self._decode, batch)
                finally:
                    self.running = []
                    self._idle.set()
                for request, outcome in zip(batch, outcomes):
                    if isinstance(outcome, Exception):
                        _resolve(request.done, error=outcome)
                    else:
                        _resolve(request.done, outcome)
