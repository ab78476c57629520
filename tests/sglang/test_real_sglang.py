"""The same flow against real SGLang (``python -m sglang.launch_server``): health, version,
generation with per-request seeds, a colocated tensor update inside the version's sequence,
and a RePO step. GPU machines only; set REPO_MEGATRON_SGLANG_MODEL to a Hugging Face model
directory (a small one: it is served with TP 1)."""

import importlib.util
import os
import sys

import pytest

from repo_megatron.config.rollout import SGLangConfig, SGLangLaunchConfig
from repo_megatron.engines.base import SamplingParams
from repo_megatron.engines.sglang import SGLangEngine
from repo_megatron.engines.sglang.launcher import ServerLauncher
from repo_megatron.runtime import cpu_compat

from .servers import free_ports

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def real_sglang(tmp_path_factory):
    model = os.environ.get("REPO_MEGATRON_SGLANG_MODEL")
    if not (cpu_compat.has_gpu() and importlib.util.find_spec("sglang") and model):
        pytest.skip("needs a GPU, SGLang (pip install '.[sglang]') and "
                    "REPO_MEGATRON_SGLANG_MODEL=<HF model dir>")
    base = free_ports(2)
    cfg = SGLangLaunchConfig(
        num_servers=1, command=[sys.executable, "-m", "sglang.launch_server"],
        args=["--model-path", model, "--mem-fraction-static", "0.5"], base_port=base,
        router=importlib.util.find_spec("sglang_router") is not None, router_port=base + 1,
        router_command=[sys.executable, "-m", "sglang_router.launch_router"])
    launcher = ServerLauncher(cfg, log_dir=str(tmp_path_factory.mktemp("sglang_logs")))
    try:
        launcher.start()
        yield launcher, model
    finally:
        launcher.stop()


def test_real_sglang_generates_and_takes_a_tensor_update(real_sglang):
    from transformers import AutoModelForCausalLM

    launcher, model = real_sglang
    settings = ({"router_url": launcher.router_url} if launcher.router_url
                else {"urls": launcher.urls})
    params = [SamplingParams(temperature=1.0, max_new_tokens=16, seed=s) for s in range(4)]
    with SGLangEngine(SGLangConfig(weight_sync="tensor", **settings)) as engine:
        first = engine.generate([[1, 2, 3]] * 4, params)
        assert engine.generate([[1, 2, 3]] * 4, params)[0].token_ids == first[0].token_ids
        weights = AutoModelForCausalLM.from_pretrained(model, dtype="auto").to(
            cpu_compat.device())
        engine.update_weights(weights.named_parameters())
        again = engine.generate([[1, 2, 3]] * 4, params)
    assert all(r.weight_version == 1 for r in again)
    assert [r.token_ids for r in again] == [r.token_ids for r in first]   # same weights
