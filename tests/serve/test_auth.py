"""API keys as SGLang checks them: our decision equals SGLang's ``decide_request_auth`` on every
combination of keys, level, path and header; over HTTP, the management endpoints need the
admin key, everything else the api key, health checks stay open."""

import itertools

import httpx
import pytest

from repo_megatron.engines.sglang_server.app import ServeOptions
from repo_megatron.engines.sglang_server.auth import AuthLevel, bearer_matches, decide

from ..sglang.inprocess import serve_model
from .conftest import needs_sglang_wheel

KEYS = [None, "", "k1", "k2"]
HEADERS = [None, "", "Bearer", "Bearer ", "Bearer k1", "bearer k1", "BEARER k1", "Bearer k2",
           "Basic k1", "Bearer k1 ", "k1", "Bearer  k1", "Token k2"]
PATHS = ["/generate", "/health", "/health_generate", "/ready", "/metrics",
         "/update_weights_from_tensor"]


def test_our_decisions_are_sglangs():
    needs_sglang_wheel()
    from sglang.srt.utils.auth import AuthLevel as SGLangLevel
    from sglang.srt.utils.auth import decide_request_auth

    cases = 0
    for method, path, header, api_key, admin_key, level in itertools.product(
            ["GET", "POST", "OPTIONS"], PATHS, HEADERS, KEYS, KEYS, list(AuthLevel)):
        theirs = decide_request_auth(method=method, path=path, authorization_header=header,
                                     api_key=api_key, admin_api_key=admin_key,
                                     auth_level=SGLangLevel(level.value))
        ours = decide(method, path, header, api_key, admin_key, level)
        assert ours == (None if theirs.allowed else theirs.error_status_code), \
            (method, path, header, api_key, admin_key, level)
        cases += 1
    assert cases == 3 * len(PATHS) * len(HEADERS) * len(KEYS) ** 2 * 3


def test_admin_endpoints_take_only_the_admin_key_once_there_is_one():
    level = AuthLevel.ADMIN_OPTIONAL
    assert decide("POST", "/pause_generation", "Bearer user", "user", "root", level) == 401
    assert decide("POST", "/pause_generation", "Bearer root", "user", "root", level) is None
    assert decide("POST", "/pause_generation", "Bearer user", "user", None, level) is None
    assert decide("POST", "/generate", "Bearer root", "user", "root", AuthLevel.NORMAL) == 401


def test_a_non_ascii_token_is_refused_not_a_crash():
    assert bearer_matches("Bearer \xe9t\xe9", "key") is False
    assert bearer_matches("Bearer cl\xe9", "cl\xe9") is True


@pytest.fixture(scope="module")
def keyed_server(model_dir):
    with serve_model(model_dir, version="0.5.8",
                     options=ServeOptions(api_key="user-key", admin_api_key="admin-key")) as s:
        yield s


def post(url, path, key=None, body=None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(url + path, json=body if body is not None else {}, headers=headers,
                      timeout=60)


def test_generation_needs_the_api_key(keyed_server):
    url, _ = keyed_server
    body = {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 1}}
    refused = post(url, "/generate", None, body)
    assert refused.status_code == 401 and refused.json() == {"error": "Unauthorized"}
    assert post(url, "/generate", "admin-key", body).status_code == 401
    assert post(url, "/generate", "user-key", body).status_code == 200
    assert httpx.get(url + "/health_generate").status_code == 200
    assert httpx.get(url + "/server_info").status_code == 401


@pytest.mark.parametrize("path", ["/update_weights_from_tensor", "/update_weights_from_disk",
                                  "/init_weights_update_group", "/abort_request",
                                  "/pause_generation", "/continue_generation", "/flush_cache",
                                  "/update_weight_version", "/destroy_weights_update_group",
                                  "/update_weights_from_distributed"])
def test_management_endpoints_need_the_admin_key(keyed_server, path):
    url, server = keyed_server
    version = server.weight_version
    for key in (None, "user-key", "wrong"):
        answer = post(url, path, key, {"new_version": "hijacked", "abort_all": True})
        assert answer.status_code == 401, (path, key)
    assert server.weight_version == version and not server.worker.paused
    assert post(url, path, "admin-key", {}).status_code != 401
    post(url, "/continue_generation", "admin-key")


def test_the_trainer_sends_the_keys_from_its_environment(keyed_server, model_dir,
                                                         monkeypatch):
    from repo_megatron.config.rollout import SGLangConfig
    from repo_megatron.engines.base import SamplingParams
    from repo_megatron.engines.sglang import SGLangEngine, SGLangError

    from ..sglang.inprocess import perturbed

    url, server = keyed_server
    params = [SamplingParams(max_new_tokens=2, seed=3)]
    monkeypatch.delenv("REPO_SGLANG_API_KEY", raising=False)
    monkeypatch.delenv("REPO_SGLANG_ADMIN_API_KEY", raising=False)
    with pytest.raises(SGLangError, match="HTTP 401"):
        SGLangEngine(SGLangConfig(urls=[url], weight_sync="tensor", max_retries=0))
    monkeypatch.setenv("REPO_SGLANG_API_KEY", "user-key")
    monkeypatch.setenv("REPO_SGLANG_ADMIN_API_KEY", "admin-key")
    with SGLangEngine(SGLangConfig(urls=[url], weight_sync="tensor")) as engine:
        before = engine.generate([[1, 2, 3]], params)[0]
        engine.update_weights(perturbed(model_dir, seed=4), version=9)   # admin endpoints
        after = engine.generate([[1, 2, 3]], params)[0]
    assert server.weight_version == "9" and after.token_ids != before.token_ids


def healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_through_sglang_router_with_one_key_as_the_slurm_jobs_run(model_dir, monkeypatch):
    """Servers and router started with the same --api-key, the trainer with it in its
    environment: generation through the router and a weight update on the workers work; the
    router refuses a client without the key."""
    import subprocess
    import sys
    import time

    from repo_megatron.config.rollout import SGLangConfig
    from repo_megatron.engines.base import SamplingParams
    from repo_megatron.engines.sglang import SGLangEngine

    from ..sglang.inprocess import perturbed
    from ..sglang.servers import free_ports

    monkeypatch.setenv("REPO_SGLANG_API_KEY", "job-key")
    monkeypatch.delenv("REPO_SGLANG_ADMIN_API_KEY", raising=False)
    with serve_model(model_dir, options=ServeOptions(api_key="job-key")) as (url, server):
        port = free_ports(1)
        router = subprocess.Popen(
            [sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1",
             "--port", str(port), "--api-key", "job-key", "--worker-urls", url,
             "--policy", "round_robin", "--log-level", "warn"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        router_url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 300          # a loaded CI machine starts it slowly
            while not healthy(router_url):
                assert router.poll() is None and time.monotonic() < deadline, \
                    "sglang-router did not start"
                time.sleep(0.5)
            body = {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 1}}
            assert httpx.post(router_url + "/generate", json=body).status_code == 401
            with SGLangEngine(SGLangConfig(router_url=router_url, weight_sync="tensor",
                                           health_timeout_s=120)) as engine:
                engine.update_weights(perturbed(model_dir, seed=6), version=3)
                [result] = engine.generate([[1, 2, 3]], [SamplingParams(max_new_tokens=2)])
            assert result.weight_version == 3 and server.weight_version == "3"
        finally:
            router.terminate()
            router.wait(30)
