"""API keys as SGLang checks them: our decision equals SGLang's ``decide_request_auth`` on every
combination of keys, level, path and header; over HTTP, the management endpoints need the
admin key, everything else the api key, health checks stay open."""

import itertools

import httpx
import pytest

from repo_megatron.serve.app import ServeOptions
from repo_megatron.serve.auth import AuthLevel, bearer_matches, decide

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
