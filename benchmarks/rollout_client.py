"""Overhead of the SGLang rollout client against a raw httpx loop to the same local server.

By default the server is a canned one speaking SGLang's /generate shape (a subprocess of this
script on loopback, answering at once), so the timings are the client's own cost and not the
model's: a CPU model's batching noise is seconds, the client's cost is milliseconds.
``--url`` points both at any running server instead (e.g. ``repo-megatron serve``). Times
rounds of the same N seeded /generate requests sent (a) by a bare ``httpx.AsyncClient`` +
``asyncio.gather`` and (b) by ``SGLangEngine.generate`` (body building, per-server limit,
retry wrapper, result parsing, version check, over aiohttp), alternating, and prints ONE JSON
line: median seconds of each, their ratio (target <= 1.2) and the overhead per request. The
client was built on httpx until its pool's cost showed in the rollouts (docs/sglang.md): a
ratio below 1 is the pool's difference, which the client's own work does not use up.

    python benchmarks/rollout_client.py [--url URL] [--requests 128] [--rounds 15]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time

import httpx

from repo_megatron.config.rollout import SGLangConfig
from repo_megatron.engines.base import SamplingParams
from repo_megatron.engines.sglang import SGLangEngine
from repo_megatron.engines.sglang.client import wait_until_healthy
from repo_megatron.engines.sglang.protocol import generate_body
from repo_megatron.runtime.ports import free_port


def canned_server(port: int, new_tokens: int) -> None:
    """Answer every /generate at once with ``new_tokens`` tokens in SGLang's shape."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    answer = {"text": "x" * new_tokens, "output_ids": list(range(new_tokens)), "meta_info": {
        "finish_reason": {"type": "length", "length": new_tokens}, "weight_version": "default",
        "output_token_logprobs": [[-1.0, t, None] for t in range(new_tokens)]}}

    async def generate(request):
        await request.body()
        return JSONResponse(answer)

    async def ok(request):
        return Response(status_code=200)

    async def info(request):
        return JSONResponse({"version": "0.5.23", "tp_size": 1})

    app = Starlette(routes=[Route("/generate", generate, methods=["POST"]),
                            Route("/health_generate", ok), Route("/server_info", info)])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def wait_healthy(url: str, timeout_s: float = 300.0) -> None:
    """Block until the server answers /health_generate (the client's own wait)."""
    wait_until_healthy(url, timeout_s)


async def raw_round(client: httpx.AsyncClient, url: str, bodies: list[dict]) -> float:
    """The baseline: every request in flight through a bare AsyncClient, JSON decoded."""
    start = time.perf_counter()
    answers = await asyncio.gather(*(client.post(url + "/generate", json=b) for b in bodies))
    for answer in answers:
        answer.raise_for_status()
        answer.json()
    return time.perf_counter() - start


async def new_client() -> httpx.AsyncClient:
    """A client made inside the loop that will use it."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    return httpx.AsyncClient(timeout=600, trust_env=False, limits=limits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=None, help="a running SGLang-protocol server")
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--canned-server", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.canned_server is not None:
        return canned_server(args.canned_server, args.max_new_tokens)
    server, url = None, args.url
    if url is None:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen([sys.executable, __file__, "--canned-server", str(port),
                                   "--max-new-tokens", str(args.max_new_tokens)])
    try:
        wait_healthy(url)
        prompts = [[1, 2, 3, 4 + i % 7] for i in range(args.requests)]
        params = [SamplingParams(temperature=1.0, max_new_tokens=args.max_new_tokens, seed=i)
                  for i in range(args.requests)]
        bodies = [generate_body(p, s) for p, s in zip(prompts, params)]
        raw, ours = [], []
        with SGLangEngine(SGLangConfig(urls=[url], max_concurrency_per_server=args.requests)) \
                as engine:
            # the baseline runs on the engine's own event loop thread, alternating with the
            # engine's rounds, so both see the same machine load and connection reuse
            client = engine.run(new_client())
            for round_index in range(args.rounds + 1):       # round 0 warms both up
                raw_s = engine.run(raw_round(client, url, bodies))
                start = time.perf_counter()
                engine.generate(prompts, params)
                if round_index:
                    raw.append(raw_s)
                    ours.append(time.perf_counter() - start)
            engine.run(client.aclose())
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
    raw_s, client_s = statistics.median(raw), statistics.median(ours)
    print(json.dumps({"benchmark": "rollout_client", "server": args.url or "canned",
                      "requests": args.requests, "max_new_tokens": args.max_new_tokens,
                      "rounds": args.rounds, "raw_httpx_s": round(raw_s, 4),
                      "client_s": round(client_s, 4), "ratio": round(client_s / raw_s, 3),
                      "overhead_ms_per_request": round(1e3 * (client_s - raw_s) / args.requests,
                                                       3)}))


if __name__ == "__main__":
    main()
