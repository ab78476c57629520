"""``repo-megatron serve`` speaks SGLang's protocol: shapes, status codes, and the behaviour
that depends on the emulated version (server_info name, begin/end weight update sessions)."""

import threading
import time

import httpx

from repo_megatron.config.rollout import SGLangConfig
from repo_megatron.engines.base import SamplingParams
from repo_megatron.engines.sglang import SGLangEngine

from .inprocess import load_tiny_engine, perturbed, serve_model
from .servers import wait_healthy

PARAMS = SamplingParams(temperature=1.0, max_new_tokens=5, seed=11)


def test_batch_answers_a_list_and_errors_have_sglang_shape(model_dir):
    with serve_model(model_dir) as (url, _):
        batch = httpx.post(url + "/generate", json={
            "input_ids": [[1, 2, 3], [4, 5]], "sampling_params": {"max_new_tokens": 3},
            "return_logprob": True}, timeout=60).json()
        assert isinstance(batch, list) and len(batch) == 2
        meta = batch[0]["meta_info"]
        assert meta["finish_reason"] == {"type": "length", "length": 3}
        assert [len(e) for e in meta["output_token_logprobs"]] == [3, 3, 3]
        bad = httpx.post(url + "/generate", json={"input_ids": []}, timeout=60)
        assert bad.status_code == 400 and "message" in bad.json()["error"]


def test_health_is_503_until_the_model_is_loaded(model_dir):
    loaded = threading.Event()

    def slow_load():
        loaded.wait(30)
        return load_tiny_engine(model_dir)

    with serve_model(model_dir, load=slow_load, wait=False) as (url, _):
        assert httpx.get(url + "/health_generate").status_code == 503
        loaded.set()
        wait_healthy(url)


def test_flush_cache_is_400_while_requests_run(model_dir):
    with serve_model(model_dir) as (url, server):
        assert httpx.post(url + "/flush_cache").status_code == 200
        request = threading.Thread(target=httpx.post, args=(url + "/generate",), kwargs=dict(
            json={"input_ids": [[1, 2]] * 4, "sampling_params": {"max_new_tokens": 40}},
            timeout=120))
        request.start()
        while not server.worker.running and request.is_alive():
            time.sleep(0.005)
        assert httpx.post(url + "/flush_cache").status_code == 400
        request.join()
        assert httpx.post(url + "/flush_cache").status_code == 200


def test_before_0_5_22_tensor_updates_need_no_session(model_dir):
    with serve_model(model_dir, version="0.5.8") as (url, server), \
            SGLangEngine(SGLangConfig(urls=[url], weight_sync="tensor")) as engine:
        assert engine.versions[url] == (0, 5, 8)        # found via /get_server_info
        assert httpx.get(url + "/server_info").status_code == 404
        assert httpx.post(url + "/begin_weight_update", json={}).status_code == 404
        before = engine.generate([[1, 2, 3]], [PARAMS])[0]
        engine.update_weights(perturbed(model_dir, seed=1))
        after = engine.generate([[1, 2, 3]], [PARAMS])[0]
    assert after.token_ids != before.token_ids
    assert after.weight_version == 1 and server.weight_version == "1"


def test_from_0_5_22_tensor_updates_run_inside_begin_end(model_dir, monkeypatch):
    with serve_model(model_dir, version="0.5.23") as (url, server), \
            SGLangEngine(SGLangConfig(urls=[url], weight_sync="tensor")) as engine:
        refused = httpx.post(url + "/update_weights_from_tensor",
                             json={"serialized_named_tensors": ["x"]})
        assert refused.status_code == 400
        assert "/begin_weight_update" in refused.json()["message"]
        calls = []
        original = engine.client.request

        async def recording(server_, endpoint, *args, **kwargs):
            calls.append(endpoint)
            return await original(server_, endpoint, *args, **kwargs)

        monkeypatch.setattr(engine.client, "request", recording)
        engine.update_weights(perturbed(model_dir, seed=2), version=7)
        assert engine.generate([[1, 2, 3]], [PARAMS])[0].weight_version == 7
    control = [c for c in calls if c not in ("/update_weights_from_tensor", "/generate")]
    assert control[:2] == ["/pause_generation", "/begin_weight_update"]
    assert control[-4:] == ["/end_weight_update", "/flush_cache", "/update_weight_version",
                            "/continue_generation"]
    assert "/update_weights_from_tensor" in calls and not server.in_update_session
