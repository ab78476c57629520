"""sglang-router: listing and registering its workers.

The router proxies ``/generate`` (round robin or cache-aware) but not the control endpoints
(``/update_weights_*``, ``/abort_request``, ``/pause_generation``, ``/continue_generation``):
those go to each worker, listed by the router's ``GET /workers`` (sglang-router >= 0.2;
``GET /list_workers`` before).
"""

from __future__ import annotations

import asyncio
import time

from .client import SGLangClient, SGLangError


async def router_workers(client: SGLangClient, router_url: str) -> list[str]:
    """URLs of the workers registered with the router."""
    try:
        answer = await client.request(router_url, "/workers", method="GET")
        return [worker["url"] for worker in answer["workers"]]
    except SGLangError as e:
        if e.status != 404:
            raise
    answer = await client.request(router_url, "/list_workers", method="GET")
    return list(answer["urls"])


async def register_worker(client: SGLangClient, router_url: str, worker_url: str,
                          timeout_s: float = 60.0) -> None:
    """Add a worker to the router and wait until the router lists it (registration runs
    in the router's background)."""
    try:
        await client.request(router_url, "/workers", {"url": worker_url})
    except SGLangError as e:
        if e.status != 404:
            raise
        await client.request(router_url, f"/add_worker?url={worker_url}")
    deadline = time.monotonic() + timeout_s
    while worker_url not in await router_workers(client, router_url):
        if time.monotonic() > deadline:
            raise SGLangError(router_url, "/workers",
                              f"{worker_url} not registered after {timeout_s:g} s")
        await asyncio.sleep(0.2)
