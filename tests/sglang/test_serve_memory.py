"""``repo-megatron serve`` treats ``/release_memory_occupation`` and
``/resume_memory_occupation`` as SGLang 0.5.23 does (``scheduler_components/weight_updater.py``):
no tags = every region, release only when idle, resuming a region it holds fails; with
``--enable-memory-saver`` the released regions are out of service (SGLang unmaps them), so the
colocated flow of the client (release -> weights back -> update -> KV cache back -> generate)
runs end to end on CPU and a wrong order fails here as it would on a GPU."""

import threading
import time

import httpx

from repo_megatron.config.rollout import SGLangConfig
from repo_megatron.engines.base import SamplingParams
from repo_megatron.engines.sglang import SGLangEngine
from repo_megatron.engines.sglang_server.app import ServeOptions

from .inprocess import perturbed, serve_model

PARAMS = SamplingParams(temperature=1.0, max_new_tokens=4, seed=3)
GENERATE = {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 2}}
SAVER = ServeOptions(memory_saver=True)


def _post(url: str, endpoint: str, body=None) -> httpx.Response:
    return httpx.post(url + endpoint, json=body, timeout=60)


def test_release_memory_without_memory_saver_frees_nothing_but_keeps_sglangs_tags(model_dir):
    with serve_model(model_dir) as (url, server):
        assert httpx.get(url + "/server_info").json()["enable_memory_saver"] is False
        assert _post(url, "/release_memory_occupation", {}).status_code == 200
        assert server.released == {"kv_cache", "weights", "cuda_graph"}   # none = all
        assert _post(url, "/generate", GENERATE).status_code == 200      # no-op adapter
        assert _post(url, "/resume_memory_occupation", {"tags": ["weights"]}).status_code == 200
        again = _post(url, "/resume_memory_occupation", {"tags": ["weights"]})
        assert again.status_code == 400 and again.json()["error"]["message"] == "'weights'"
        assert _post(url, "/resume_memory_occupation", {"tags": 1}).status_code == 400


def test_release_memory_on_a_server_without_memory_saver_is_warned_about(model_dir, caplog):
    with serve_model(model_dir) as (url, _), caplog.at_level("WARNING"):
        SGLangEngine(SGLangConfig(urls=[url], weight_sync="tensor")).close()
        SGLangEngine(SGLangConfig(urls=[url], weight_sync="disk")).close()
    warned = [r.getMessage() for r in caplog.records if "--enable-memory-saver" in r.getMessage()]
    assert warned == [f"{url} runs without --enable-memory-saver: its memory release "
                      f"(rollout.sglang.release_memory) only flushes the cache, its weights and "
                      f"KV cache stay on the GPU while the trainer trains"]


def test_release_memory_with_memory_saver_takes_regions_out_of_service(model_dir):
    with serve_model(model_dir, options=SAVER) as (url, server):
        assert httpx.get(url + "/server_info").json()["enable_memory_saver"] is True
        assert _post(url, "/release_memory_occupation",
                     {"tags": ["kv_cache", "weights", "cuda_graph"]}).status_code == 200
        refused = _post(url, "/generate", GENERATE)
        assert refused.status_code == 400 and "memory released" in refused.text
        update = _post(url, "/update_weights_from_disk", {"model_path": model_dir})
        assert update.status_code == 400 and "memory released (weights)" in update.json()["message"]
        assert _post(url, "/resume_memory_occupation", {"tags": ["weights"]}).status_code == 200
        assert "kv_cache" in _post(url, "/generate", GENERATE).text      # still released
        assert _post(url, "/resume_memory_occupation",
                     {"tags": ["kv_cache", "cuda_graph"]}).status_code == 200
        assert server.released == set()
        assert _post(url, "/generate", GENERATE).status_code == 200


def test_release_memory_is_refused_while_a_request_runs(model_dir):
    with serve_model(model_dir, options=SAVER) as (url, server):
        request = threading.Thread(target=_post, args=(url, "/generate", {
            "input_ids": [[1, 2]] * 4, "sampling_params": {"max_new_tokens": 40}}))
        request.start()
        while not server.worker.running and request.is_alive():
            time.sleep(0.005)
        busy = _post(url, "/release_memory_occupation", {})
        request.join()
        assert busy.status_code == 400 and "idle" in busy.json()["error"]["message"]
        assert server.released == set()


def test_colocated_release_memory_flow_runs_end_to_end(model_dir):
    """The client's order against a memory-saver server: released for training, weights back
    for the update, the KV cache back at the next generation (an offloaded trainer's order),
    which samples with the new weights."""
    with serve_model(model_dir, options=SAVER) as (url, server), \
            SGLangEngine(SGLangConfig(urls=[url], weight_sync="tensor")) as engine:
        before = engine.generate([[1, 2, 3]], [PARAMS])[0]
        engine.generation_memory_after_update = False
        engine.release_memory()
        assert server.released == {"kv_cache", "weights", "cuda_graph"}
        engine.update_weights(perturbed(model_dir, seed=2))
        assert server.released == {"kv_cache", "cuda_graph"}    # the trainer still holds its GPU
        after = engine.generate([[1, 2, 3]], [PARAMS])[0]
        assert server.released == set()
    assert after.weight_version == 1 and after.token_ids != before.token_ids


def test_release_memory_pauses_a_running_request_away_first(model_dir):
    """SGLang refuses a release while anything runs (the test above); the client pauses in
    ``abort`` mode first, so a straggler is answered aborted instead of failing the release,
    and the next generation continues the servers."""
    straggler = {}
    with serve_model(model_dir, options=SAVER) as (url, server), \
            SGLangEngine(SGLangConfig(urls=[url], weight_sync="tensor")) as engine:
        request = threading.Thread(target=lambda: straggler.update(_post(url, "/generate", {
            "input_ids": [1, 2], "sampling_params": {"max_new_tokens": 400}}).json()))
        request.start()
        while not server.worker.running and request.is_alive():
            time.sleep(0.005)
        assert server.worker.running                       # the release meets a busy server
        engine.release_memory()
        request.join(60)
        assert server.released == {"kv_cache", "weights", "cuda_graph"}
        assert server.worker.paused
        after = engine.generate([[1, 2, 3]], [PARAMS])[0]  # resumes and continues
        assert server.released == set() and not server.worker.paused
    assert straggler["meta_info"]["finish_reason"]["type"] == "abort"
    assert len(after.token_ids) == PARAMS.max_new_tokens
