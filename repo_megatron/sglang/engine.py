"""The rollout engine over SGLang servers: :class:`SGLangEngine` implements
:class:`~repo_megatron.rollout.engine.RolloutEngine`, so the RePO stage runs on it unchanged.

    engine = SGLangEngine(cfg.rollout.sglang)      # waits for health, detects versions
    results = engine.generate(prompt_ids, params)  # one /generate per request, all in flight
    engine.update_weights(hf_named_tensors)         # pause, (begin), buckets, (end), flush, go
    engine.close()

Requests go to the router when one is configured (it balances them), else to the workers in
turn; a request whose server fails with a connection error or 503 moves on to the next one.
The blocking API runs an asyncio loop of its own in a background thread, so it works from any
caller, including one that runs its own event loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Iterable, Optional, Sequence

import torch

from ..config.rollout import SGLangConfig
from ..rollout.engine import (FutureStream, GenerationResult, RolloutEngine, SamplingParams,
                              check_requests)
from .client import SGLangClient, SGLangError
from .protocol import (generate_body, generation_result, needs_weight_update_session,
                       parse_version, parse_weight_version)
from .router import router_workers

log = logging.getLogger(__name__)


class SGLangEngine(RolloutEngine):
    """Rollouts from SGLang workers (``cfg.urls``) or through sglang-router
    (``cfg.router_url``); weights pushed with the ``cfg.weight_sync`` strategy."""

    def __init__(self, cfg: SGLangConfig, start: bool = True):
        from .weight_sync import build_strategy

        if not (cfg.urls or cfg.router_url):
            raise ValueError("SGLangEngine needs sglang.urls or sglang.router_url")
        self.cfg = cfg
        self.client = SGLangClient(cfg.request_timeout_s, cfg.max_concurrency_per_server,
                                   cfg.max_retries, cfg.retry_backoff_s)
        self.strategy = build_strategy(cfg)
        self.versions: dict[str, tuple[int, ...]] = {}   # worker URL -> SGLang version
        self.tp_sizes: dict[str, int] = {}               # worker URL -> engine TP size
        self._version = 0
        self._next = 0                                   # round robin over the workers
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="sglang-client")
        self._thread.start()
        if start:
            self.run(self.start())

    # -- plumbing ---------------------------------------------------------------------------
    def run(self, coro):
        """Run a coroutine on the engine's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def close(self) -> None:
        """Close the HTTP connections and stop the loop (idempotent)."""
        if self._loop.is_closed():
            return
        self.run(self.client.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> "SGLangEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

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
        served = {parse_weight_version(info.get("weight_version")) for info in infos} - {None}
        if len(served) > 1:
            log.warning("SGLang workers serve different weight versions %s", sorted(served))
        self._version = max(served, default=0)
        log.info("SGLang workers %s", {w: ".".join(map(str, v)) for w, v in self.versions.items()})

    @property
    def needs_weight_update_session(self) -> bool:
        """Whether some worker is SGLang >= 0.5.22 (begin/end around tensor updates)."""
        return any(needs_weight_update_session(v) for v in self.versions.values())

    async def post_all(self, endpoint: str, body: Optional[dict] = None,
                       workers: Optional[Sequence[str]] = None) -> list:
        """POST the same body to every worker (the router does not proxy control
        endpoints); fails if any worker fails."""
        workers = list(workers) if workers is not None else await self.workers()
        return await asyncio.gather(*(self.client.request(w, endpoint, body) for w in workers))

    def abort(self) -> None:
        """Abort every request running on the workers (``/abort_request abort_all``); their
        callers get ``finish_reason == "abort"``, which :meth:`generate` raises as an error."""
        self.run(self.post_all("/abort_request", {"abort_all": True}))

    # -- RolloutEngine ----------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]],
                 params: Sequence[SamplingParams]) -> list[GenerationResult]:
        check_requests(prompts, params)
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
        return FutureStream(lambda ids, p: asyncio.run_coroutine_threadsafe(
            self.generate_one(self.rotation(), list(ids), p), self._loop))

    def rotation(self) -> list[str]:
        """Where the next request goes: the router, or the workers starting with the next
        in turn (the others are its fallbacks)."""
        targets = [self.cfg.router_url] if self.cfg.router_url else list(self.cfg.urls)
        start = self._next % len(targets)
        self._next += 1
        return targets[start:] + targets[:start]

    async def generate_one(self, servers: list[str], input_ids: list[int],
                           params: SamplingParams) -> GenerationResult:
        """One request; on a retryable failure it goes to the next server of ``servers``."""
        answer = await self.client.request(servers, "/generate", generate_body(input_ids, params))
        if isinstance(answer, list):        # SGLang answers a batch with a list
            answer = answer[0]
        result = generation_result(answer)
        served = parse_weight_version((answer.get("meta_info") or {}).get("weight_version"))
        if result.finish_reason == "abort":
            raise SGLangError(servers[0], "/generate", f"request aborted: "
                                                       f"{answer['meta_info']['finish_reason']}")
        if served is not None and served != self._version:
            raise SGLangError(servers[0], "/generate", f"answered with weight_version {served}, "
                                                       f"expected {self._version} (stale weights)")
        result.weight_version = self._version
        return result

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]],
                       version: Optional[int] = None) -> None:
        """Push Hugging Face-named tensors to every worker with the configured strategy;
        ``named_tensors`` is consumed in the caller's thread (it may run collectives)."""
        from .weight_sync.session import sync_weights

        version = self._version + 1 if version is None else version
        sync_weights(self, named_tensors, version)
        self._version = version
