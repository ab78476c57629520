"""Starting a pool of SGLang servers (and sglang-router in front of them) and stopping it.

    with ServerLauncher(cfg.rollout.sglang.launch) as pool:
        urls, router_url = pool.start()          # healthy, registered with the router
        ...                                       # every process is stopped on exit or error

``local`` mode runs the servers as processes of this node; ``srun`` mode runs each as a step
of the current SLURM allocation, server i on node i mod N (bind them to ``0.0.0.0`` or the
node's address with ``launch.host`` so the trainer can reach them). Each process gets its own
session, so stopping it stops its children too.

The launcher adds what a training run needs to the configured arguments: the servers get
``--enable-deterministic-inference`` when ``deterministic_inference`` is set (SGLang ignores
``sampling_seed`` without it), and the router gets health-check settings loose enough that a
worker busy loading weights for minutes is not marked dead
(``router_health_check_interval_s`` x ``router_health_failure_threshold``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import time
from typing import Optional

from ...config.rollout import SGLangLaunchConfig
from .client import SGLangClient, SGLangError
from .router import register_worker

log = logging.getLogger(__name__)


def slurm_nodes() -> list[str]:
    """Host names of the current SLURM allocation."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise RuntimeError("launch.mode=srun needs a SLURM allocation (SLURM_JOB_NODELIST)")
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True,
                         capture_output=True, text=True).stdout
    return out.split()


class ServerLauncher:
    """Starts ``cfg.num_servers`` servers (and sglang-router if ``cfg.router``)."""

    def __init__(self, cfg: SGLangLaunchConfig, log_dir: Optional[str] = None):
        self.cfg, self.log_dir = cfg, log_dir
        self.processes: list[subprocess.Popen] = []
        self.urls: list[str] = []
        self.router_url: Optional[str] = None

    def server_command(self, index: int) -> tuple[list[str], str]:
        """(argv, URL) of server ``index``."""
        port = self.cfg.base_port + index
        argv = [*self.cfg.command, *self.cfg.args, "--host", self.cfg.host, "--port", str(port)]
        if self.cfg.deterministic_inference:
            argv.append("--enable-deterministic-inference")
        if self.cfg.mode == "srun":
            nodes = slurm_nodes()
            node = nodes[index % len(nodes)]
            argv = ["srun", "--nodes=1", "--ntasks=1", f"--nodelist={node}", *self.cfg.srun_args,
                    *argv]
            return argv, f"http://{node}:{port}"
        return argv, f"http://{self.cfg.host}:{port}"

    def router_command(self) -> list[str]:
        """sglang-router's argv: the configured arguments, then the health checks (later
        flags win, so ``router_args`` cannot silently undo them: set the knobs instead)."""
        c = self.cfg
        return [*c.router_command, *c.router_args, "--host", c.host, "--port", str(c.router_port),
                "--health-check-interval-secs", str(c.router_health_check_interval_s),
                "--health-check-timeout-secs", str(c.router_health_check_timeout_s),
                "--health-failure-threshold", str(c.router_health_failure_threshold)]

    def spawn(self, argv: list[str], name: str) -> subprocess.Popen:
        """Start one process in its own session, output to ``log_dir/name.log`` if set."""
        out = open(os.path.join(self.log_dir, f"{name}.log"), "ab") if self.log_dir else None
        log.info("starting %s: %s", name, " ".join(argv))
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        if out is not None:
            out.close()             # the child holds its own descriptor
        self.processes.append(process)
        return process

    def start(self) -> tuple[list[str], Optional[str]]:
        """Start everything and wait until it serves; returns (worker URLs, router URL).
        On any failure every process started so far is stopped."""
        try:
            if self.log_dir:
                os.makedirs(self.log_dir, exist_ok=True)
            for index in range(self.cfg.num_servers):
                argv, url = self.server_command(index)
                self.spawn(argv, f"sglang-{index}")
                self.urls.append(url)
            if self.cfg.router:
                self.router_url = f"http://{self.cfg.host}:{self.cfg.router_port}"
                self.spawn(self.router_command(), "router")
            asyncio.run(self.wait_and_register())
        except BaseException:
            self.stop()
            raise
        return list(self.urls), self.router_url

    async def wait_and_register(self) -> None:
        """Wait for every server's /health_generate (failing fast if one exits), then
        register each with the router."""
        client = SGLangClient(timeout_s=30.0)
        try:
            await asyncio.gather(*(self.wait_healthy(client, url, process) for url, process
                                   in zip(self.urls, self.processes)))
            if self.router_url:
                await self.wait_router(client)
                for url in self.urls:
                    await register_worker(client, self.router_url, url)
        finally:
            await client.aclose()

    async def wait_healthy(self, client: SGLangClient, url: str,
                           process: subprocess.Popen) -> None:
        deadline = time.monotonic() + self.cfg.startup_timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise SGLangError(url, "", f"server exited with code {process.returncode} "
                                           f"while starting (see its log)")
            try:
                await client.request_once(url, "/health_generate", method="GET")
                return
            except SGLangError:
                await asyncio.sleep(0.5)
        raise SGLangError(url, "/health_generate",
                          f"not healthy after {self.cfg.startup_timeout_s:g} s")

    async def wait_router(self, client: SGLangClient) -> None:
        router = self.processes[-1]
        deadline = time.monotonic() + 60.0
        while time.monotonic() < deadline:
            if router.poll() is not None:
                raise SGLangError(self.router_url, "", f"sglang-router exited with code "
                                                       f"{router.returncode}")
            try:
                await client.request_once(self.router_url, "/workers", method="GET")
                return
            except SGLangError:
                await asyncio.sleep(0.2)
        raise SGLangError(self.router_url, "/workers", "sglang-router did not start in 60 s")

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM every process group, SIGKILL what is left after ``grace_s``."""
        for process in self.processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for process in self.processes:
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.processes.clear()

    def __enter__(self) -> "ServerLauncher":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

