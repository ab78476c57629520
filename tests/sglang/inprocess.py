"""A ``repo-megatron serve`` server inside the test process (no start-up cost), for tests that
look at its state or need several protocol versions."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

from repo_megatron.engines.sglang_server.app import ServeOptions, SGLangServer
from repo_megatron.engines.sglang_server.worker import EngineWorker

from .servers import free_ports, serve_in_thread, wait_healthy


def load_tiny_engine(model_dir: str, batch_size: int = 16):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from repo_megatron.engines.embedded import HFEngine

    return HFEngine(AutoModelForCausalLM.from_pretrained(model_dir),
                    AutoTokenizer.from_pretrained(model_dir), batch_size=batch_size)


def perturbed(model_dir: str, seed: int):
    """Every parameter of the tiny model plus noise: weights that sample differently."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    model = load_tiny_engine(model_dir).model
    return [(name, p.detach() + torch.randn(p.shape, generator=generator))
            for name, p in model.named_parameters()]


@contextlib.contextmanager
def serve_model(model_dir: str, version: str = "0.5.23", load: Optional[Callable] = None,
                wait: bool = True, options: Optional[ServeOptions] = None
                ) -> Iterator[tuple[str, SGLangServer]]:
    """(URL, server) of an in-process server of the tiny model emulating ``version``."""
    worker = EngineWorker(load or (lambda: load_tiny_engine(model_dir)), batch_size=16)
    server = SGLangServer(worker, model_dir, version=version, options=options)
    with serve_in_thread(server.app(), free_ports(1)) as url:
        if wait:
            wait_healthy(url)
        yield url, server
