"""The CPU engine behind ``repo-megatron serve``: continuous batching, pause/continue, abort,
and weight updates, all on one engine thread.

As SGLang's scheduler does, the engine thread steps one :class:`~..embedded.HFStream`
(one forward: a prefill or one decoded token for every running row) and, between two steps,
takes the requests that arrived meanwhile (up to ``batch_size`` rows: they are prefilled and
join the running batch), drops the aborted ones and answers the finished ones at once: a short
request does not wait for a long one. Each request keeps its own seed, so joining a running
batch does not change its sample (up to float rounding of the padded batch). When the engine is
idle, a request waits ``BATCH_WINDOW_S`` for the others sent with it, so they share a prefill.

``/pause_generation`` stops at the next step in SGLang's modes: ``abort`` (every request
answered aborted), ``retract`` (running requests give up their rows and cache and wait; after
``/continue_generation`` their prompt and tokens are prefilled again, under the weights of that
time) and ``in_place`` (they keep their cache and go on from it). Weight updates and other
engine calls run on the engine thread between steps; unless generation is paused they wait for
the running requests to finish and hold new ones back (SGLang's model-update lock), so no
request samples from two sets of weights without a pause. A step that fails is retried request
by request, so only the request that fails gets the error. The engine thread is a daemon:
stopping the server never waits for a model load.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

from ..base import GenerationResult, SamplingParams
from ..embedded import HFEngine, HFStream
from .gate import brief

log = logging.getLogger(__name__)

BATCH_WINDOW_S = 0.01
PAUSE_MODES = ("abort", "retract", "in_place")


@dataclass
class Request:
    """One ``/generate`` request waiting for (or in) the running batch."""
    rid: str
    input_ids: list[int]
    params: SamplingParams
    done: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    aborted: bool = False       # read by the engine thread between steps
    ticket: Optional[int] = None                # in the engine's stream (engine thread)
    # (weight version, tokens generated before it changed), as SGLang's WeightVersionEvent
    version_events: list[tuple[str, int]] = field(default_factory=list)


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
                post(loop, _resolve, future, None, e)
            else:
                post(loop, _resolve, future, result)

    def submit(self, fn, *args) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.jobs.put((loop, future, fn, args))
        return future

    def close(self) -> None:
        self.jobs.put(None)


def post(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
    """Call ``fn(*args)`` on ``loop`` from the engine thread (nothing once the loop closed:
    the server is gone)."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        if not loop.is_closed():
            raise


class EngineWorker:
    """Owns the :class:`HFEngine` once ``load()`` has built it (``status`` goes from
    ``starting`` to ``up``).

    ``queue`` holds the requests waiting for a row, ``running`` those handed to the engine
    (decoding, or held by a pause); both are the event loop's. The engine thread's serve job
    (:meth:`_serve`) steps the stream while there is work and generation is not paused."""

    def __init__(self, load: Callable[[], HFEngine], batch_size: int = 64):
        self.load, self.batch_size = load, batch_size
        self.engine: Optional[HFEngine] = None
        self.status = "starting"
        self.engine_thread = EngineThread()
        self.queue: list[Request] = []
        self.running: list[Request] = []
        self.paused = False
        self.pause_mode = "abort"
        self.stream: Optional[HFStream] = None       # the engine thread's
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()  # running, not in the stream yet
        self.tickets: dict[int, Request] = {}          # the stream's requests (engine thread)
        self._serving: Optional[asyncio.Future] = None  # the serve job, while it runs
        self._exclusive = 0                   # engine calls waiting for the batch to drain
        self._window: Optional[asyncio.TimerHandle] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    async def start(self) -> None:
        """Load the model on the engine thread, then serve."""
        self._loop = asyncio.get_running_loop()
        try:
            self.engine = await self.engine_thread.submit(self.load)
        except Exception:
            self.status = "failed"
            log.exception("loading the model failed")
            raise
        self.stream = self.engine.stream()
        self.status = "up"
        self._advance()

    async def stop(self, grace_s: float = 2.0) -> None:
        """Abort every request, and give the engine ``grace_s`` to finish its current step."""
        self.status = "stopping"
        if self._window is not None:
            self._window.cancel()
        self.abort_all("server shutting down")
        self.engine_thread.close()
        await asyncio.to_thread(self.engine_thread.thread.join, grace_s)

    async def on_engine_thread(self, fn, *args):
        """``fn(*args)`` on the engine thread, between two steps. Unless generation is
        paused, the running requests finish first and new ones wait until it returns."""
        self._exclusive += 1
        try:
            return await self.engine_thread.submit(fn, *args)
        finally:
            self._exclusive -= 1
            self._advance()

    @property
    def busy(self) -> bool:
        """Requests hold rows of the batch, or wait while generation is not paused (SGLang
        refuses a cache flush then; a ``retract`` pause frees the rows)."""
        held = self.stream is not None and bool(self.stream.rows)
        return held or (bool(self.queue or self.running) and not self.paused)

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
        if self._serving is not None:                   # joins at the engine's next step
            self._advance()
        elif self._window is None:
            # requests sent together arrive over many connections: let them share a prefill
            self._window = self._loop.call_later(BATCH_WINDOW_S, self._window_closed)
        return list(await asyncio.gather(*(r.done for r in requests), return_exceptions=True))

    def abort(self, rid: Optional[str] = None, message: str = "Abort requested") -> None:
        """Finish queued and running requests (all, or the one with ``rid``) as aborted;
        running ones leave the engine's batch at its next step."""
        for request in self.queue + self.running:
            if rid is None or request.rid == rid:
                request.aborted = True
                _resolve(request.done, message)
        self.queue = [r for r in self.queue if not r.aborted]
        self._advance()

    def abort_all(self, message: str = "Abort requested") -> None:
        self.abort(None, message)

    def abort_all_soon(self, message: str) -> None:
        """:meth:`abort_all` from another thread or a signal handler."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.abort_all, message)

    async def pause(self, mode: str = "abort") -> None:
        """Stop generation at the engine's next step in SGLang's ``mode`` (module docstring);
        returns once the engine has stopped."""
        if mode not in PAUSE_MODES:
            raise ValueError(f"mode {brief(mode)} is not one of {list(PAUSE_MODES)}")
        self.paused, self.pause_mode = True, mode
        if mode == "abort":
            self.abort_all()
        if self._serving is None and self.running and self.status == "up":
            self._start_serving()          # a new mode for requests an earlier pause holds
        if self._serving is not None:
            await asyncio.shield(self._serving)

    def resume(self) -> None:
        self.paused = False
        self._advance()

    def record_weight_version(self, old_version: str) -> None:
        """The server's weight version is about to change from ``old_version``: every request
        that has generated tokens records how many (SGLang's ``record_weight_version_events``).
        Exact while generation is paused or idle, as a weight update leaves it."""
        generated = self.stream.generated() if self.stream is not None else {}
        for request in self.running:
            tokens = generated.get(request.ticket, 0)
            if tokens:
                request.version_events.append((old_version, tokens))

    # -- the event loop's side -------------------------------------------------------------
    def _window_closed(self) -> None:
        self._window = None
        self._advance()

    def _advance(self) -> None:
        """Hand waiting requests to the engine while the batch has room (not while paused or
        while an engine call waits), and start the serve job when it has work: requests to
        decode, or aborted ones a pause holds."""
        if self.status != "up":
            return
        if not (self.paused or self._exclusive):
            while self.queue and len(self.running) < self.batch_size:
                request = self.queue.pop(0)
                self.running.append(request)
                self.inbox.put(request)
        work = any(r.aborted for r in self.running) if self.paused else bool(self.running)
        if self._serving is None and work:
            self._start_serving()

    def _start_serving(self) -> None:
        self._serving = self.engine_thread.submit(self._serve)
        self._serving.add_done_callback(self._served)

    def _served(self, job: asyncio.Future) -> None:
        self._serving = None
        if not job.cancelled() and job.exception() is not None:
            log.error("the engine's serve job failed", exc_info=job.exception())
        self._advance()

    def _finished(self, request: Request, outcome: object) -> None:
        """``request`` has left the engine with ``outcome`` (its result or error)."""
        self.running.remove(request)
        if isinstance(outcome, Exception):
            _resolve(request.done, error=outcome)
        else:
            _resolve(request.done, outcome)      # an aborted one was answered already
        self._advance()

    # -- the engine thread's side ----------------------------------------------------------
    def _serve(self) -> None:
        """Step the stream until it is empty or generation is paused; between steps take the
        requests handed over and drop the aborted ones."""
        stream = self.stream
        try:
            while True:
                while not self.inbox.empty():
                    request = self.inbox.get()
                    request.ticket = stream.submit(request.input_ids, request.params)
                    self.tickets[request.ticket] = request
                aborted = [t for t, r in self.tickets.items() if r.aborted]
                if aborted:
                    self._answer(stream.cancel(aborted))
                if self.paused:
                    if self.pause_mode == "retract":
                        stream.retract()
                    return
                if not self.tickets:
                    return
                self._answer(stream.step())
        except Exception as error:
            self._recover(error)

    def _answer(self, finished: list[tuple[int, GenerationResult]]) -> None:
        for ticket, result in finished:
            post(self._loop, self._finished, self.tickets.pop(ticket), result)

    def _recover(self, error: Exception) -> None:
        """After a failed step the stream's state is unknown: start a new stream and run each
        request it held alone, so the error reaches only the requests that cause it."""
        requests = list(self.tickets.values())
        self.tickets.clear()
        self.stream = self.engine.stream()
        if len(requests) == 1:
            log.error("generation failed for request %s", requests[0].rid, exc_info=error)
            post(self._loop, self._finished, requests[0], error)
            return
        for request in requests:
            try:
                (outcome,) = self.engine.generate([request.input_ids], [request.params],
                                                  cancelled=lambda _, r=request: r.aborted)
            except Exception as e:
                log.exception("generation failed for request %s", request.rid)
                outcome = e
            post(self._loop, self._finished, request, outcome)
