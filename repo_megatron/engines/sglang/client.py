"""Asynchronous HTTP to SGLang servers: a concurrency limit per server, retries with
exponential backoff on connection errors and 503, and a timeout on every request.

Every error names the server and the endpoint, so a failed step says which machine to look at.
Retries are for transient faults only: 400 (a bad request, or a server refusing an operation)
fails at once, and a request that hits its timeout is not retried (a hung server would only
hang again); the caller decides whether another server should get it.

API keys come from the environment, never from a config file: ``$REPO_SGLANG_API_KEY`` is sent
as ``Authorization: Bearer`` to every server and router (their ``--api-key``);
``$REPO_SGLANG_ADMIN_API_KEY``, if set, instead to SGLang's management endpoints (their
``--admin-api-key``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

from .protocol import error_message, parse_version

if TYPE_CHECKING:
    import aiohttp

log = logging.getLogger(__name__)

# 503: starting / overloaded / shutting down; 502 and 504: a router whose worker went away.
RETRYABLE_STATUS = frozenset({502, 503, 504})

API_KEY_ENV, ADMIN_API_KEY_ENV = "REPO_SGLANG_API_KEY", "REPO_SGLANG_ADMIN_API_KEY"
# SGLang's ADMIN_OPTIONAL endpoints that the trainer calls (http_server.py, 0.5.23)
ADMIN_ENDPOINTS = frozenset({
    "/abort_request", "/pause_generation", "/continue_generation", "/flush_cache",
    "/begin_weight_update", "/end_weight_update", "/update_weights_from_disk",
    "/update_weights_from_tensor", "/init_weights_update_group",
    "/update_weights_from_distributed", "/destroy_weights_update_group",
    "/update_weight_version", "/release_memory_occupation", "/resume_memory_occupation"})


class SGLangError(RuntimeError):
    """An SGLang endpoint failed: ``SGLang <server><endpoint>: <what>``."""

    def __init__(self, server: str, endpoint: str, message: str, status: Optional[int] = None):
        self.server, self.endpoint, self.status = server, endpoint, status
        code = f"HTTP {status}: " if status is not None else ""
        super().__init__(f"SGLang {server}{endpoint}: {code}{message}")


class SGLangTimeout(SGLangError):
    """A request got no answer within its timeout."""


class SGLangClient:
    """JSON over HTTP to any number of SGLang servers (workers or an sglang-router).

    ``timeout_s``: per request; ``max_concurrency_per_server``: requests in flight to one
    server; ``max_retries``: extra attempts after a connection error or a retryable status,
    sleeping ``backoff_s * 2**attempt`` (at most ``max_backoff_s``) in between.
    """

    def __init__(self, timeout_s: float = 600.0, max_concurrency_per_server: int = 64,
                 max_retries: int = 3, backoff_s: float = 0.5, max_backoff_s: float = 8.0,
                 api_key: Optional[str] = None, admin_api_key: Optional[str] = None):
        self.api_key = api_key or os.environ.get(API_KEY_ENV) or None
        self.admin_api_key = admin_api_key or os.environ.get(ADMIN_API_KEY_ENV) or None
        self.timeout_s = timeout_s
        self.max_concurrency = max_concurrency_per_server
        self.max_retries = max_retries
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self._limits: dict[str, asyncio.Semaphore] = {}
        self._http: Optional["aiohttp.ClientSession"] = None

    def set_limit(self, server: str, in_flight: int) -> None:
        """Requests in flight to ``server`` at most (default ``max_concurrency_per_server``):
        a router gets its engines' limits summed. Call it before any request to ``server``."""
        self._limits[server] = asyncio.Semaphore(in_flight)

    @property
    def http(self) -> "aiohttp.ClientSession":
        """The connection pool: aiohttp, created lazily inside the event loop that uses it;
        no limit of its own (the per-server semaphores are the limit), no proxy from the
        environment. Not httpx: its pool checks every connection for every request it places,
        which cost the rollout ~0.4 s of CPU per 64 concurrent /generate requests
        (docs/sglang.md). Imported here: a trainer that never talks to a server (the GPU
        check's image has no aiohttp) does not need it."""
        import aiohttp

        if self._http is None:
            self._http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                               trust_env=False)
        return self._http

    def headers(self, endpoint: str) -> dict[str, str]:
        """The ``Authorization`` header for ``endpoint`` (none without keys)."""
        admin = self.admin_api_key and endpoint.split("?")[0] in ADMIN_ENDPOINTS
        key = self.admin_api_key if admin else self.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (0-based)."""
        return min(self.backoff_s * 2 ** attempt, self.max_backoff_s)

    async def request(self, server: Union[str, Sequence[str]], endpoint: str, body: Any = None,
                      *, method: str = "POST", timeout_s: Optional[float] = None,
                      retries: Optional[int] = None) -> Any:
        """Send one request, retrying transient faults; returns the JSON answer (the text
        when it is not JSON). ``server`` may be a list: attempt k goes to ``server[k % n]``,
        so a dead worker's request moves on to the next one. Raises :class:`SGLangError` /
        :class:`SGLangTimeout`."""
        servers = [server] if isinstance(server, str) else list(server)
        retries = self.max_retries if retries is None else retries
        for attempt in range(retries + 1):
            try:
                return await self.request_once(servers[attempt % len(servers)], endpoint, body,
                                               method=method, timeout_s=timeout_s)
            except SGLangTimeout:
                raise
            except SGLangError as e:
                if attempt == retries or not self.retryable(e):
                    raise
                delay = self.backoff(attempt)
                log.warning("%s; retry %d/%d in %.1f s", e, attempt + 1, retries, delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    @staticmethod
    def retryable(error: SGLangError) -> bool:
        """Connection errors (no status) and 502/503/504 are worth another attempt."""
        return error.status is None or error.status in RETRYABLE_STATUS

    async def request_once(self, server: str, endpoint: str, body: Any = None, *,
                           method: str = "POST", timeout_s: Optional[float] = None) -> Any:
        """One attempt, within the server's concurrency limit and the timeout."""
        import aiohttp

        limit = self._limits.setdefault(server, asyncio.Semaphore(self.max_concurrency))
        timeout = self.timeout_s if timeout_s is None else timeout_s
        async with limit:
            try:
                async with self.http.request(method, server + endpoint, json=body,
                                             headers=self.headers(endpoint),
                                             timeout=aiohttp.ClientTimeout(total=timeout)
                                             ) as response:
                    status, text = response.status, await response.text()
            except asyncio.TimeoutError as e:
                raise SGLangTimeout(server, endpoint, f"no answer within {timeout:g} s "
                                                      f"({type(e).__name__})") from e
            except aiohttp.ClientError as e:      # connection errors: worth another attempt
                raise SGLangError(server, endpoint, f"{type(e).__name__}: {e}") from e
        if not 200 <= status < 300:
            raise SGLangError(server, endpoint, error_message(status, text), status)
        try:
            return json.loads(text)
        except ValueError:
            return text

    async def wait_healthy(self, server: str, timeout_s: float = 600.0,
                           poll_s: float = 0.5) -> None:
        """Wait until ``/health_generate`` answers 200 (503 while the server starts)."""
        deadline = time.monotonic() + timeout_s
        last: Optional[Exception] = None
        while time.monotonic() < deadline:
            try:
                await self.request_once(server, "/health_generate", method="GET",
                                        timeout_s=min(30.0, timeout_s))
                return
            except SGLangError as e:
                last = e
            await asyncio.sleep(poll_s)
        raise SGLangError(server, "/health_generate", f"not healthy after {timeout_s:g} s "
                                                      f"(last: {last})")

    async def retry_while_busy(self, server: str, endpoint: str, body: Any = None, *,
                               timeout_s: float = 60.0) -> Any:
        """POST ``endpoint`` until it stops answering 400 (SGLang refuses ``/flush_cache``
        while requests run or wait), backing off as :meth:`backoff`, for at most
        ``timeout_s`` (slime waits about 60 s)."""
        deadline = time.monotonic() + timeout_s
        attempt = 0
        while True:
            try:
                return await self.request(server, endpoint, body)
            except SGLangError as e:
                left = deadline - time.monotonic()
                if e.status != 400 or left <= 0:
                    if e.status == 400:
                        raise SGLangError(server, endpoint, f"still refused after "
                                                            f"{timeout_s:g} s: {e}", 400) from e
                    raise
                await asyncio.sleep(min(self.backoff(attempt), left))
                attempt += 1

    async def server_info(self, server: str) -> dict:
        """``/server_info`` (SGLang >= 0.5.9), falling back to ``/get_server_info``."""
        try:
            return await self.request(server, "/server_info", method="GET")
        except SGLangError as e:
            if e.status != 404:
                raise
        return await self.request(server, "/get_server_info", method="GET")

    async def server_version(self, server: str) -> tuple[int, ...]:
        """The server's SGLang version, e.g. ``(0, 5, 23)``."""
        info = await self.server_info(server)
        if not isinstance(info, dict) or "version" not in info:
            raise SGLangError(server, "/server_info", "answer has no 'version'")
        return parse_version(info["version"])

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def __aenter__(self) -> "SGLangClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()


def wait_until_healthy(url: str, timeout_s: float = 600.0) -> None:
    """Block until the server at ``url`` answers ``/health_generate`` (for scripts and tests
    that start one)."""
    async def wait() -> None:
        async with SGLangClient() as client:
            await client.wait_healthy(url, timeout_s)

    asyncio.run(wait())


class LoopThread:
    """An asyncio event loop running in a daemon thread, so blocking code (the trainer, which
    may itself run inside an event loop) can run coroutines on it."""

    def __init__(self, name: str = "sglang-client"):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name=name)
        self.thread.start()

    def run(self, coro):
        """Run ``coro`` on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    @property
    def closed(self) -> bool:
        return self.loop.is_closed()

    def close(self) -> None:
        """Stop the loop and join its thread (idempotent)."""
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()
        self.loop.close()
