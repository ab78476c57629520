"""The rollout engine over SGLang servers: :class:`SGLangEngine` implements
:class:`~repo_megatron.engines.base.RolloutEngine`, so the RePO stage runs on it unchanged.

    engine = SGLangEngine(cfg.rollout.sglang)      # waits for health, reads versions, TP sizes
    results = engine.generate(prompt_ids, params)  # one /generate per request, all in flight
    engine.update_weights(hf_named_tensors)         # pause, (begin), buckets, (end), flush, go
    engine.close()

Requests go to the router when one is configured (it balances them), else to the workers in
turn; a request whose server fails with a connection error or 503 moves on to the next one,
and a request that a weight update's pause aborted is sent again. The blocking API runs an
asyncio loop of its own in a background thread, so it works from any caller, including one
that runs its own event loop. In a Megatron run the update is planned here but streamed by
every pipeline stage (:mod:`repo_megatron.weight_sync.streamer`).
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from typing import Iterable, Optional, Sequence

import torch

from ...config.rollout import SGLangConfig
from ...weight_sync.buckets import iter_buckets
from ...weight_sync.sender import StageSender, make_client
from ...weight_sync.session import UpdateSession, plan_update
from ..base import (FutureStream, GenerationResult, RolloutEngine, SamplingParams,
                    check_requests)
from .client import LoopThread, SGLangError
from .protocol import (ABORT_ALL, EMPTY, MEMORY_TAGS, WEIGHTS_TAG, generate_body,
                       generation_result, memory_body, parse_version, parse_weight_version,
                       pause_body)
from .router import router_workers

log = logging.getLogger(__name__)


class SGLangEngine(RolloutEngine):
    """Rollouts from SGLang workers (``cfg.urls``) or through sglang-router
    (``cfg.router_url``); weights pushed with the ``cfg.weight_sync`` strategy."""

    def __init__(self, cfg: SGLangConfig, start: bool = True):
        if not (cfg.urls or cfg.router_url):
            raise ValueError("SGLangEngine needs sglang.urls or sglang.router_url")
        self.cfg = cfg
        self.client = make_client(cfg)
        self.loop = LoopThread("sglang-client")
        # the sender of pipeline stage 0 (or of every weight, in one process)
        self.sender = StageSender(cfg, 0, loop=self.loop, client=self.client)
        self.versions: dict[str, tuple[int, ...]] = {}   # worker URL -> SGLang version
        self.tp_sizes: dict[str, int] = {}               # worker URL -> engine TP size
        self.disk_dir = cfg.disk_dir or (tempfile.mkdtemp(prefix="repo_megatron_weights_")
                                         if self.sender.strategy.uses_disk_dir else "")
        self._released: list[str] = []                 # memory regions released, in order
        self._pauses = 0                                 # /pause_generation calls so far
        self._paused_for_release = False                 # paused by release_memory
        self._version = 0
        self._next = 0                                   # round robin over the workers
        if start:
            self.run(self.start())

    # -- plumbing ---------------------------------------------------------------------------
    def run(self, coro):
        """Run a coroutine on the engine's loop and wait for its result."""
        return self.loop.run(coro)

    def close(self) -> None:
        """Destroy the update groups, close the HTTP connections, stop the loop
        (idempotent)."""
        if self.loop.closed:
            return
        try:
            self.sender.close()
        finally:
            self.run(self.client.aclose())
            self.loop.close()

    def __enter__(self) -> "SGLangEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def weight_sync_strategy(self) -> type:
        """The ``rollout.sglang.weight_sync`` strategy: how the trainer's stages stream to these
        workers."""
        return type(self.sender.strategy)

    # -- servers ----------------------------------------------------------------------------
    async def workers(self) -> list[str]:
        """The worker URLs: the router's ``GET /workers`` if there is a router, else
        ``cfg.urls``."""
        if self.cfg.router_url:
            return await router_workers(self.client, self.cfg.router_url)
        return list(self.cfg.urls)

    async def start(self) -> None:
        """Wait until every worker is healthy; record its version, TP size, weight version."""
        workers = await self.workers()
        if not workers:
            raise SGLangError(self.cfg.router_url or "", "/workers", "the router lists no worker")
        await asyncio.gather(*(self.client.wait_healthy(w, self.cfg.health_timeout_s)
                               for w in workers))
        infos = await asyncio.gather(*(self.client.server_info(w) for w in workers))
        for worker, info in zip(workers, infos):
            self.versions[worker] = parse_version(info.get("version", "0"))
            self.tp_sizes[worker] = int(info.get("tp_size", 1))
            if self.cfg.launch.deterministic_inference and \
                    info.get("enable_deterministic_inference") is False:
                raise SGLangError(worker, "/server_info", "launch.deterministic_inference is "
                                  "set but the server runs without "
                                  "--enable-deterministic-inference: it would ignore seeds")
            if self.cfg.releases_memory and info.get("enable_memory_saver") is False:
                log.warning("%s runs without --enable-memory-saver: its memory release "
                            "(rollout.sglang.release_memory) only flushes the cache, its "
                            "weights and KV cache stay on the GPU while the trainer trains",
                            worker)
        if self.cfg.router_url:     # the router balances: every engine's limit is open to it
            self.client.set_limit(self.cfg.router_url, self.max_in_flight(len(workers)))
        served = {parse_weight_version(info.get("weight_version")) for info in infos} - {None}
        if len(served) > 1:
            log.warning("SGLang workers serve different weight versions %s", sorted(served))
        self._version = max(served, default=0)
        log.info("SGLang workers %s", {w: ".".join(map(str, v)) for w, v in self.versions.items()})

    def max_in_flight(self, engines: int) -> int:
        """Generation requests in flight at once: ``max_concurrency_per_server`` per engine,
        over the ``engines`` the router lists (slime's per-engine concurrency x engines)."""
        return self.cfg.max_concurrency_per_server * engines

    async def post_all(self, endpoint: str, body: Optional[dict] = None,
                       workers: Optional[Sequence[str]] = None) -> list:
        """POST the same body to every worker (the router does not proxy control
        endpoints); fails if any worker fails."""
        workers = list(workers) if workers is not None else await self.workers()
        return await asyncio.gather(*(self.client.request(w, endpoint, body) for w in workers))

    @property
    def memory_released(self) -> bool:
        """Whether some of the servers' memory is released (:meth:`release_memory`) and not
        resumed yet."""
        return bool(self._released)

    def release_memory(self) -> None:
        """Colocated runs (``releases_memory``): free the servers' GPU memory for training
        (``/release_memory_occupation`` of every region still held, in SGLang's order); the
        next update or generation resumes it. SGLang asserts an idle scheduler, so the servers
        are paused first in ``abort`` mode (which returns once nothing runs: a straggler of a
        failed rollout, or another client's request, is answered aborted), and the next
        generation continues them."""
        held = [tag for tag in MEMORY_TAGS if tag not in self._released]
        if not self.cfg.releases_memory or not held:
            return
        self.note_pause()
        self.run(self.post_all("/pause_generation", pause_body("abort")))
        self._paused_for_release = True
        self.run(self.post_all("/release_memory_occupation", memory_body(held)))
        self._released += held

    async def resume_weights_memory(self, workers: Sequence[str]) -> None:
        """A weight update's first step on released servers: the weights' memory back on
        ``workers`` (the KV cache and CUDA graphs stay released until :meth:`resume_memory`)."""
        await self.resume_memory([WEIGHTS_TAG], workers)

    async def resume_memory(self, tags: Optional[list[str]] = None,
                            workers: Optional[Sequence[str]] = None) -> None:
        """What :meth:`release_memory` freed back on ``workers`` (default: all): every region
        still released (before generating), or those of ``tags``. Only released regions are
        named: SGLang fails on resuming one it holds."""
        resumed = [tag for tag in self._released if tags is None or tag in tags]
        if resumed:
            await self.post_all("/resume_memory_occupation", memory_body(resumed), workers)
            self._released = [tag for tag in self._released if tag not in resumed]
        if tags is None and workers is None and self._paused_for_release:
            await self.post_all("/continue_generation", EMPTY)
            self._paused_for_release = False

    def note_pause(self) -> None:
        """Count a ``/pause_generation`` a weight update is about to send: a request that
        comes back aborted after it is sent again (:meth:`generate_one`)."""
        self._pauses += 1

    def abort(self) -> None:
        """Abort every request running on the workers (``/abort_request abort_all``); their
        callers get ``finish_reason == "abort"``, which :meth:`generate` raises as an error."""
        self.run(self.post_all("/abort_request", ABORT_ALL))

    # -- RolloutEngine ----------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]],
                 params: Sequence[SamplingParams]) -> list[GenerationResult]:
        check_requests(prompts, params)
        self.run(self.resume_memory())
        return self.run(self.generate_async(prompts, params))

    async def generate_async(self, prompts: Sequence[Sequence[int]],
                             params: Sequence[SamplingParams]) -> list[GenerationResult]:
        """All requests in flight at once (bounded per server by the client); the first
        failure cancels the rest."""
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(self.generate_one(self.rotation(), list(ids), p))
                         for ids, p in zip(prompts, params)]
        except BaseExceptionGroup as failures:
            raise failures.exceptions[0] from None      # the first failure, as it was raised
        return [task.result() for task in tasks]

    def stream(self) -> FutureStream:
        """Each request is sent as soon as it is submitted (a group's rephrases go out while
        other groups still decode)."""
        self.run(self.resume_memory())
        return FutureStream(lambda ids, p: asyncio.run_coroutine_threadsafe(
            self.generate_one(self.rotation(), list(ids), p), self.loop.loop))

    def rotation(self) -> list[str]:
        """Where the next request goes: the router, or the workers starting with the next
        in turn (the others are its fallbacks)."""
        targets = [self.cfg.router_url] if self.cfg.router_url else list(self.cfg.urls)
        start = self._next % len(targets)
        self._next += 1
        return targets[start:] + targets[:start]

    async def generate_one(self, servers: list[str], input_ids: list[int],
                           params: SamplingParams) -> GenerationResult:
        """One request; on a retryable failure it goes to the next server of ``servers``.
        A request aborted by a weight update's pause (``pause_mode: abort``) is sent again
        (it then waits for ``/continue_generation``); any other abort is an error."""
        for attempt in range(self.cfg.max_retries + 1):
            pauses = self._pauses
            answer = await self.client.request(servers, "/generate",
                                               generate_body(input_ids, params))
            if isinstance(answer, list):        # SGLang answers a batch with a list
                answer = answer[0]
            result = generation_result(answer)
            if result.finish_reason != "abort" or self._pauses == pauses:
                break
            log.info("a request aborted by a weight update is sent again (%d/%d)", attempt + 1,
                     self.cfg.max_retries)
        served = parse_weight_version((answer.get("meta_info") or {}).get("weight_version"))
        if result.finish_reason == "abort":
            raise SGLangError(servers[0], "/generate", f"request aborted: "
                                                       f"{answer['meta_info']['finish_reason']}")
        if served is not None and served != self._version:
            raise SGLangError(servers[0], "/generate", f"answered with weight_version {served}, "
                                                       f"expected {self._version} (stale weights)")
        result.weight_version = self._version
        return result

    def begin_update(self, version: Optional[int] = None) -> UpdateSession:
        """The update to ``version`` (default: the current one + 1) as a context: paused and
        open on entry; on a clean exit finished and the engine's version set; always
        resumed. Stages push in between (``update.plan``, ``update.stage_results``)."""
        return UpdateSession(self, plan_update(self, self._version + 1 if version is None
                                               else version))

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]],
                       version: Optional[int] = None) -> None:
        """Push Hugging Face-named tensors to every worker from this process, bucket by
        bucket; ``named_tensors`` is consumed in the caller's thread (it may run
        collectives)."""
        with self.begin_update(version) as update:
            buckets = iter_buckets(named_tensors, self.cfg.weight_bucket_mb << 20)
            update.stage_results.append(self.sender.send(update.plan, buckets))
