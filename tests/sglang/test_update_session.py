"""The sequence around a weight update, against recording workers: sessions by capability per
worker, flush retried while refused, versions set without aborting held requests, generation
always continued, memory released and resumed, the pause mode sent, requests a pause aborted
sent again; the launcher's determinism and health flags."""

import contextlib
import threading

import pytest
import torch
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from repo_megatron.config.rollout import SGLangConfig, SGLangLaunchConfig
from repo_megatron.engines.base import SamplingParams
from repo_megatron.engines.sglang import SGLangEngine, SGLangError
from repo_megatron.engines.sglang.launcher import ServerLauncher

from .servers import GENERATED, RecordingWorker, free_ports, serve_in_thread

WEIGHTS = [("model.norm.weight", torch.ones(4)), ("lm_head.weight", torch.randn(3, 4))]


@contextlib.contextmanager
def workers(*recorders):
    with contextlib.ExitStack() as stack:
        base = free_ports(len(recorders))
        yield [stack.enter_context(serve_in_thread(r.app(), base + i))
               for i, r in enumerate(recorders)]


def engine_on(urls, **settings) -> SGLangEngine:
    return SGLangEngine(SGLangConfig(urls=urls, retry_backoff_s=0.05, **settings))


def test_sessions_open_only_where_the_worker_has_them_and_close_where_opened():
    new, old = RecordingWorker(), RecordingWorker(missing=("/begin_weight_update",
                                                            "/end_weight_update"))
    with workers(new, old) as urls, engine_on(urls, weight_sync="tensor") as engine:
        engine.update_weights(WEIGHTS)
    assert new.endpoints() == ["/pause_generation", "/begin_weight_update",
                               "/update_weights_from_tensor", "/end_weight_update",
                               "/flush_cache", "/update_weight_version", "/continue_generation"]
    assert old.endpoints() == ["/pause_generation", "/update_weights_from_tensor",
                               "/flush_cache", "/update_weight_version", "/continue_generation"]


def test_disk_updates_open_no_session(tmp_path):
    worker = RecordingWorker()
    with workers(worker) as urls, engine_on(urls, weight_sync="disk",
                                            disk_dir=str(tmp_path)) as engine:
        engine.update_weights(WEIGHTS)
    assert "/begin_weight_update" not in worker.endpoints()
    (directory,) = [body["model_path"] for e, body in worker.calls
                    if e == "/update_weights_from_disk"]
    assert directory == str(tmp_path / "weights_v000001")


def test_flush_is_retried_while_refused_and_the_version_keeps_held_requests():
    worker = RecordingWorker(refusals={"/flush_cache": [400, 400, 400]})
    with workers(worker) as urls, engine_on(urls, weight_sync="tensor") as engine:
        engine.update_weights(WEIGHTS, version=7)
        assert engine.weight_version == 7
    assert worker.endpoints().count("/flush_cache") == 4
    (version,) = [body for e, body in worker.calls if e == "/update_weight_version"]
    assert version == {"new_version": "7", "abort_all_requests": False}


def test_a_flush_refused_past_its_timeout_fails_naming_the_worker_and_still_continues():
    worker = RecordingWorker(refusals={"/flush_cache": [400] * 1000})
    with workers(worker) as urls, engine_on(urls, weight_sync="tensor",
                                            flush_cache_timeout_s=0.5) as engine:
        with pytest.raises(SGLangError, match=r"/flush_cache.*still refused after 0.5 s"):
            engine.update_weights(WEIGHTS)
        assert engine.weight_version == 0
    assert worker.endpoints()[-1] == "/continue_generation"


def test_a_failed_push_closes_the_session_and_continues_generation():
    worker = RecordingWorker(refusals={"/update_weights_from_tensor": [400]})
    with workers(worker) as urls, engine_on(urls, weight_sync="tensor") as engine:
        with pytest.raises(SGLangError, match="update_weights_from_tensor"):
            engine.update_weights(WEIGHTS)
    assert worker.endpoints()[-2:] == ["/end_weight_update", "/continue_generation"]
    assert "/update_weight_version" not in worker.endpoints()


@pytest.mark.parametrize("mode", ["abort", "retract", "in_place"])
def test_the_pause_mode_is_sent_and_in_place_skips_the_flush(mode):
    worker = RecordingWorker()
    with workers(worker) as urls, engine_on(urls, weight_sync="tensor",
                                            pause_mode=mode) as engine:
        engine.update_weights(WEIGHTS)
    assert worker.calls[0] == ("/pause_generation", {"mode": mode})
    assert ("/flush_cache" in worker.endpoints()) == (mode != "in_place")


def test_released_memory_is_resumed_weights_first_then_the_rest():
    worker = RecordingWorker()
    with workers(worker) as urls, engine_on(urls, weight_sync="tensor") as engine:
        engine.release_memory()                  # on by default for the colocated strategy
        engine.release_memory()                  # once
        engine.update_weights(WEIGHTS)
    memory = [(e, b) for e, b in worker.calls if "memory" in e]
    assert memory == [("/release_memory_occupation",
                       {"tags": ["kv_cache", "weights", "cuda_graph"]}),
                      ("/resume_memory_occupation", {"tags": ["weights"]}),
                      ("/resume_memory_occupation", {"tags": ["kv_cache", "cuda_graph"]})]
    assert worker.endpoints().index("/resume_memory_occupation") < \
        worker.endpoints().index("/update_weights_from_tensor")


def test_release_memory_with_an_offloaded_trainer_resumes_kv_cache_at_the_next_generation():
    """The trainer still holds its GPU memory during the update: the KV cache comes back only
    when generation starts (after the trainer's offload), and only what is released is named
    (SGLang fails on resuming a region it holds)."""
    worker = RecordingWorker()
    with workers(worker) as urls, engine_on(urls, weight_sync="tensor") as engine:
        engine.generation_memory_after_update = False
        engine.release_memory()
        engine.update_weights(WEIGHTS)
        after_update = [(e, b) for e, b in worker.calls if "memory" in e]
        engine.generate([[1, 2]], [SamplingParams(max_new_tokens=2)])
        engine.generate([[1, 2]], [SamplingParams(max_new_tokens=2)])   # nothing to resume
        engine.release_memory()
    memory = [(e, b) for e, b in worker.calls if "memory" in e]
    assert after_update == memory[:2] == [
        ("/release_memory_occupation", {"tags": ["kv_cache", "weights", "cuda_graph"]}),
        ("/resume_memory_occupation", {"tags": ["weights"]})]
    assert memory[2:] == [
        ("/resume_memory_occupation", {"tags": ["kv_cache", "cuda_graph"]}),
        ("/release_memory_occupation", {"tags": ["kv_cache", "weights", "cuda_graph"]})]
    assert worker.endpoints().index("/resume_memory_occupation", 2) < \
        worker.endpoints().index("/generate")


def test_disaggregated_runs_do_not_release_memory(tmp_path):
    worker = RecordingWorker()
    with workers(worker) as urls, engine_on(urls, weight_sync="disk",
                                            disk_dir=str(tmp_path)) as engine:
        engine.release_memory()
    assert worker.calls == []


class PausingWorker(RecordingWorker):
    """``/generate`` holds the first request until a pause arrives and answers it aborted,
    as SGLang's ``abort`` pause mode does; later requests wait for ``/continue_generation``
    (SGLang queues them while paused)."""

    def __init__(self):
        super().__init__()
        self.paused, self.continued = threading.Event(), threading.Event()
        self.started = threading.Event()
        self.generations = 0

    async def post(self, request):
        if request.path_params["path"] == "pause_generation":
            self.paused.set()
        if request.path_params["path"] == "continue_generation":
            self.continued.set()
        return await super().post(request)

    async def generate(self, request):
        import asyncio
        self.generations += 1
        self.started.set()
        if self.generations == 1:
            while not self.paused.is_set():
                await asyncio.sleep(0.01)
            return JSONResponse({"text": "", "output_ids": [], "meta_info": {
                "finish_reason": {"type": "abort", "message": "paused"},
                "output_token_logprobs": [], "weight_version": "default"}})
        while not self.continued.is_set():
            await asyncio.sleep(0.01)
        return JSONResponse({**GENERATED, "meta_info": {**GENERATED["meta_info"],
                                                        "weight_version": "1"}})

    def app(self):
        app = super().app()
        return Starlette(routes=[Route("/generate", self.generate, methods=["POST"]),
                                 *app.routes])


def test_a_request_aborted_by_the_pause_is_sent_again_and_answered_with_new_weights():
    worker = PausingWorker()
    with workers(worker) as urls, engine_on(urls, weight_sync="tensor",
                                            pause_mode="abort") as engine:
        outcome = {}
        rollout = threading.Thread(target=lambda: outcome.update(
            result=engine.generate([[1, 2]], [SamplingParams(seed=1)])))
        rollout.start()
        assert worker.started.wait(30)           # the request runs when the pause comes
        engine.update_weights(WEIGHTS)
        rollout.join(timeout=60)
    assert outcome["result"][0].token_ids == [7, 2]
    assert outcome["result"][0].weight_version == 1
    assert worker.generations == 2


def test_an_abort_without_a_pause_is_an_error():
    worker = PausingWorker()
    worker.paused.set()                          # answers aborted at once, no pause happened
    worker.continued.set()
    with workers(worker) as urls, engine_on(urls) as engine:
        with pytest.raises(SGLangError, match="request aborted"):
            engine.generate([[1, 2]], [SamplingParams(seed=1)])


def test_launcher_passes_deterministic_inference_and_router_health_checks():
    cfg = SGLangLaunchConfig(num_servers=1, deterministic_inference=True,
                             router_health_check_interval_s=30,
                             router_health_check_timeout_s=45,
                             router_health_failure_threshold=12)
    launcher = ServerLauncher(cfg)
    argv, _ = launcher.server_command(0)
    assert "--enable-deterministic-inference" in argv
    router = launcher.router_command()
    assert router[router.index("--health-check-interval-secs") + 1] == "30"
    assert router[router.index("--health-check-timeout-secs") + 1] == "45"
    assert router[router.index("--health-failure-threshold") + 1] == "12"
    assert "--enable-deterministic-inference" not in \
        ServerLauncher(SGLangLaunchConfig(num_servers=1)).server_command(0)[0]


def test_servers_whose_memory_is_released_start_with_memory_saver():
    """Without --enable-memory-saver SGLang's release frees nothing: the launch adds it where
    the run releases memory (colocated), once, and nowhere else."""
    import os

    from repo_megatron.config import load_config

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    shipped = load_config(os.path.join(root, "examples", "configs",
                                       "llama3_70b_repo_colocated.yaml"), [])
    assert shipped.rollout.sglang.server_args.count("--enable-memory-saver") == 1
    colocated = SGLangConfig(weight_sync="tensor",
                             launch=SGLangLaunchConfig(args=["--mem-fraction-static", "0.5"]))
    assert colocated.server_args == ["--mem-fraction-static", "0.5", "--enable-memory-saver"]
    assert SGLangConfig(weight_sync="disk").server_args == []
    assert SGLangConfig(weight_sync="tensor", release_memory=False).server_args == []


def test_nccl_group_and_broadcast_run_on_the_rank_gpu_not_the_worker_thread_gpu(monkeypatch):
    """torch's current GPU is per thread: the sender's event loop and the threads that run the
    NCCL calls start on GPU 0. The strategy captures the rank's device where it is built (the
    rank's main thread) and every NCCL call runs in a thread scoped to that device."""
    from repo_megatron.runtime import cpu_compat
    from repo_megatron.weight_sync import distributed

    rank_gpu = torch.device("meta")    # stands for the rank's cuda:N; tensors can move there
    scoped = threading.local()

    @contextlib.contextmanager
    def device_scope(device):
        scoped.device = device
        try:
            yield
        finally:
            del scoped.device

    calls = []

    def record(what, result=None):
        def call(*args):
            calls.append((what, threading.current_thread() is threading.main_thread(),
                          getattr(scoped, "device", None), args))
            return result
        return call

    monkeypatch.setattr(cpu_compat, "device", lambda: rank_gpu)
    monkeypatch.setattr(cpu_compat, "device_scope", device_scope)
    monkeypatch.setattr(distributed, "init_weight_update_group", record("init", "group"))
    monkeypatch.setattr(distributed, "broadcast_tensors", record("broadcast"))
    monkeypatch.setattr(distributed, "destroy", record("destroy"))
    worker = RecordingWorker()
    with workers(worker) as urls, engine_on(urls, weight_sync="distributed",
                                            distributed_backend="nccl") as engine:
        engine.update_weights(WEIGHTS)
    init, broadcast = calls[:2]
    assert [c[:3] for c in (init, broadcast)] == [("init", False, rank_gpu),
                                                  ("broadcast", False, rank_gpu)]
    group, tensors = broadcast[3]
    assert group == "group" and [t.device for t in tensors] == [rank_gpu] * len(WEIGHTS)
    assert "/update_weights_from_distributed" in worker.endpoints()
