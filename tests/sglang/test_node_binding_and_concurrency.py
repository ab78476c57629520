"""Colocated engines are bound to their trainer ranks by node, never by the router's list order
(sgl-router lists workers in the order of a UUID-keyed map); rollout concurrency is the
per-engine limit times the engines the router lists. Fake routers list their workers shuffled
and count the requests in flight; the real sglang-router in front of two ``serve`` workers
shows the limit filling both."""

import asyncio
import importlib.util
import random
import subprocess
import sys
import threading
import time

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from repo_megatron.config.rollout import SGLangConfig
from repo_megatron.engines.base import SamplingParams
from repo_megatron.engines.sglang import SGLangEngine
from repo_megatron.engines.sglang.client import SGLangClient
from repo_megatron.engines.sglang.router import router_workers
from repo_megatron.weight_sync.node_binding import bind_engines

from .inprocess import serve_model
from .servers import GENERATED, FakeWorker, free_ports, serve_in_thread

NODES = [f"gpu{i:03d}" for i in range(1, 9)]


def node(name: str) -> frozenset:
    """What node_names() gives on a cluster node: full and short names, its address."""
    return frozenset({name, f"{name}.cluster.local", f"10.0.0.{int(name[3:])}"})


class ShuffledRouter(FakeWorker):
    """sgl-router's ``GET /workers`` with the workers in a new order at each call; its
    ``/generate`` holds each request a moment and records the most in flight at once. Worker
    URLs may point back at this app (``/e<i>/...`` answers health and server info, as a
    fake worker does)."""

    def __init__(self, workers: list[str], seed: int = 0):
        super().__init__(lambda attempt: "ok")
        self.workers, self.random = list(workers), random.Random(seed)
        self.in_flight = self.peak = 0

    async def list_workers(self, request: Request) -> Response:
        order = self.workers[:]
        self.random.shuffle(order)
        return JSONResponse({"workers": [{"id": str(i), "url": u} for i, u in enumerate(order)]})

    async def generate(self, request: Request) -> Response:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        await asyncio.sleep(0.2)
        self.in_flight -= 1
        return JSONResponse(GENERATED)

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/workers", self.list_workers),
                                 Route("/generate", self.generate, methods=["POST"]),
                                 Route("/{engine}/health_generate", self.health),
                                 Route("/{engine}/server_info", self.info)])


async def _router_workers(router_url):
    async with SGLangClient() as client:
        return await router_workers(client, router_url)


def test_node_binding_pairs_each_node_with_its_own_engine_in_any_router_order():
    urls = [f"http://{name}:30000" for name in NODES]
    router = ShuffledRouter(urls, seed=1)
    with serve_in_thread(router.app(), free_ports(1)) as router_url:
        listed = [asyncio.run(_router_workers(router_url)) for _ in range(5)]
    assert any(order != urls for order in listed)       # the router's order is not ours
    for order in listed:
        assert sorted(order) == urls
        assert bind_engines(order, [node(n) for n in NODES], node(NODES[0])) == urls


def test_node_binding_gives_a_node_s_engines_to_its_groups_in_port_order():
    workers = ["http://gpu002:30001", "http://gpu001:30001", "http://gpu002:30000",
               "http://gpu001:30000"]
    groups = [node("gpu001"), node("gpu001"), node("gpu002"), node("gpu002")]
    assert bind_engines(workers, groups, groups[0]) == [
        "http://gpu001:30000", "http://gpu001:30001", "http://gpu002:30000",
        "http://gpu002:30001"]
    # addresses and full names match too
    assert bind_engines(["http://10.0.0.2:30000", "http://gpu001.cluster.local:30000"],
                        [node("gpu001"), node("gpu002")], node("gpu001")) == [
        "http://gpu001.cluster.local:30000", "http://10.0.0.2:30000"]


def test_node_binding_refuses_a_node_without_its_engine_naming_both():
    workers = ["http://gpu001:30000", "http://gpu003:30000"]
    with pytest.raises(RuntimeError, match=r"engine group 1 run on gpu002.cluster.local, but "
                                           r"no engine left on that node among "
                                           r"\['http://gpu001:30000', 'http://gpu003:30000'\]"):
        bind_engines(workers, [node("gpu001"), node("gpu002")], node("gpu001"))


def test_node_binding_puts_loopback_workers_on_the_engine_ranks_node():
    workers = ["http://127.0.0.1:30001", "http://localhost:30000"]
    here = node("gpu001")
    assert bind_engines(workers, [here, here], here) == ["http://localhost:30000",
                                                         "http://127.0.0.1:30001"]
    with pytest.raises(RuntimeError, match="engine group 1 run on gpu002"):
        bind_engines(workers[:1] + ["http://gpu001:30000"], [here, node("gpu002")], here)


def test_rollout_concurrency_is_per_engine_limit_times_router_engines():
    port = free_ports(1)
    base = f"http://127.0.0.1:{port}"
    router = ShuffledRouter([f"{base}/e{i}" for i in range(3)])
    with serve_in_thread(router.app(), port) as url, \
            SGLangEngine(SGLangConfig(router_url=url, max_concurrency_per_server=2)) as engine:
        assert engine.max_in_flight(3) == 6
        results = engine.generate([[1, 2]] * 20, [SamplingParams(max_new_tokens=2)] * 20)
    assert len(results) == 20
    assert router.peak == 6          # 2 per engine x 3 engines, not 2 for the one router URL


def test_rollout_concurrency_fills_every_engine_behind_the_real_router(model_dir, tmp_path):
    """Two in-process ``serve`` workers behind sglang-router (round robin), two requests per
    engine: the workers together hold four requests at the peak, never more, each its share."""
    if importlib.util.find_spec("sglang_router") is None:
        pytest.skip("needs sglang-router (pip install sglang-router)")
    peaks = {"total": 0, "a": 0, "b": 0}
    done = threading.Event()

    def watch(a, b):
        while not done.is_set():
            held = [len(w.queue) + len(w.running) for w in (a.worker, b.worker)]
            peaks.update(total=max(peaks["total"], sum(held)), a=max(peaks["a"], held[0]),
                         b=max(peaks["b"], held[1]))
            time.sleep(0.001)

    port = free_ports(1)
    router_url = f"http://127.0.0.1:{port}"
    with serve_model(model_dir) as (url_a, a), serve_model(model_dir) as (url_b, b), \
            open(tmp_path / "router.log", "wb") as log:
        router = subprocess.Popen(
            [sys.executable, "-m", "sglang_router.launch_router", "--worker-urls", url_a, url_b,
             "--policy", "round_robin", "--host", "127.0.0.1", "--port", str(port),
             "--log-level", "warn"], stdout=log, stderr=subprocess.STDOUT)
        watcher = threading.Thread(target=watch, args=(a, b))
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if httpx.get(router_url + "/health", timeout=5).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline and router.poll() is None, \
                    (tmp_path / "router.log").read_text()[-2000:]
                time.sleep(0.2)
            with SGLangEngine(SGLangConfig(router_url=router_url,
                                           max_concurrency_per_server=2)) as engine:
                assert engine.max_in_flight(2) == 4
                watcher.start()
                results = engine.generate(
                    [[1, 2, 3]] * 12,
                    [SamplingParams(temperature=1.0, max_new_tokens=24, seed=i)
                     for i in range(12)])
        finally:
            done.set()
            if watcher.is_alive():
                watcher.join()
            router.terminate()
            router.wait(timeout=30)
    assert len(results) == 12
    assert peaks["total"] == 4, peaks        # 2 per engine x 2 engines, through one router URL
    assert peaks["a"] >= 1 and peaks["b"] >= 1, peaks
