"""Servers for the SGLang tests: free loopback ports, an in-process uvicorn server, and a
scripted fake worker (503s, hangs) for fault tests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from typing import Callable, Iterator

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from repo_megatron.engines.sglang.client import wait_until_healthy
from repo_megatron.runtime.ports import free_port


def free_ports(n: int) -> int:
    """A base port p with p, p+1, ..., p+n-1 free on 127.0.0.1."""
    for _ in range(100):
        base = free_port()
        if base + n >= 65535:
            continue
        try:
            with contextlib.ExitStack() as stack:
                for port in range(base, base + n):
                    s = stack.enter_context(socket.socket())
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError(f"no {n} consecutive free ports")


@contextlib.contextmanager
def serve_in_thread(app, port: int) -> Iterator[str]:
    """Run an ASGI app on 127.0.0.1:port in a thread; yields its URL; always stops it."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError(f"test server on port {port} did not start")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = server.force_exit = True    # do not wait for hung requests
        thread.join(timeout=10)


def wait_healthy(url: str, timeout_s: float = 60.0) -> None:
    """Block until ``url`` answers /health_generate (the client's own wait)."""
    wait_until_healthy(url, timeout_s)


GENERATED = {"text": "ok", "output_ids": [7, 2],
             "meta_info": {"finish_reason": {"type": "stop", "matched": 2},
                           "output_token_logprobs": [[-0.5, 7, None], [-0.25, 2, None]],
                           "weight_version": "default"}}


class FakeWorker:
    """A worker whose ``/generate`` answers ``script(attempt)``: an int status (with an
    SGLang error body), ``"hang"`` (never answers), or ``"ok"`` (a fixed generation)."""

    def __init__(self, script: Callable[[int], object]):
        self.script, self.calls = script, 0

    async def generate(self, request: Request) -> Response:
        self.calls += 1
        action = self.script(self.calls)
        if action == "hang":
            await asyncio.sleep(3600)
        if isinstance(action, int):
            return JSONResponse({"error": {"message": f"scripted {action}"}}, status_code=action)
        return JSONResponse(GENERATED)

    async def health(self, request: Request) -> Response:
        return Response(status_code=200)

    async def info(self, request: Request) -> Response:
        return JSONResponse({"version": "0.5.23", "tp_size": 1, "weight_version": "default"})

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/generate", self.generate, methods=["POST"]),
                                 Route("/health_generate", self.health),
                                 Route("/server_info", self.info)])


class RecordingWorker:
    """A worker that answers every control and weight endpoint like SGLang (``{"success",
    "message"}``) and records ``(endpoint, body)``. ``missing``: endpoints it does not have
    (404, an older SGLang); ``refusals[endpoint]``: statuses its first calls answer (e.g.
    ``/flush_cache`` refused with 400 while requests run)."""

    def __init__(self, tp_size: int = 1, missing: tuple = (), refusals: dict | None = None):
        self.tp_size, self.missing = tp_size, set(missing)
        self.refusals = {k: list(v) for k, v in (refusals or {}).items()}
        self.calls: list[tuple[str, object]] = []

    def endpoints(self) -> list[str]:
        return [endpoint for endpoint, _ in self.calls]

    async def post(self, request: Request) -> Response:
        endpoint = "/" + request.path_params["path"]
        raw = await request.body()
        body = json.loads(raw) if raw.strip() else None
        if endpoint in self.missing:
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        self.calls.append((endpoint, body))
        pending = self.refusals.get(endpoint)
        if pending:
            return JSONResponse({"success": False, "message": "scripted"},
                                status_code=pending.pop(0))
        return JSONResponse({"success": True, "message": "ok"})

    async def info(self, request: Request) -> Response:
        return JSONResponse({"version": "0.5.23", "tp_size": self.tp_size,
                             "weight_version": "default"})

    async def health(self, request: Request) -> Response:
        return Response(status_code=200)

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/health_generate", self.health),
                                 Route("/server_info", self.info),
                                 Route("/{path:path}", self.post, methods=["POST"])])
