"""Weight sync streams from every pipeline stage: at TP2 x PP2 (gloo) no rank's resident
memory grows by more than two buckets plus a fixed overhead while weights many times larger
than a bucket reach the embedded engine (loaded exactly) or the disk shards of every stage."""

import json
import os
from datetime import timedelta

import pytest

from repo_megatron.config import config_from_dict
from tests.distributed import run_distributed
from tests.helpers import write_tiny_llama
from tests.run.conftest import tiny_run_config

BUCKET_MB = 4
OVERHEAD_MB = 16        # pickled headers, gloo buffers, a TP gather in flight: not proportional


def big_llama(directory: str) -> str:
    """16 layers, hidden 512: 159 MB of fp32 weights, no tensor above 4 MB (one bucket)."""
    return write_tiny_llama(directory, num_layers=16, vocab_size=2048, hidden_size=512,
                            intermediate_size=1024, num_attention_heads=8, num_key_value_heads=4,
                            head_dim=64)


def _megatron_streamer(cfg_dict: dict):
    """(config, model chunks, WeightStreamer) of this rank, torch.distributed started."""
    from repo_megatron.models.builder import build_model
    from repo_megatron.runtime import distributed
    from repo_megatron.weight_sync.streamer import WeightStreamer

    cfg = config_from_dict(cfg_dict)
    distributed.initialize(cfg.parallel, cfg.seed)
    arch = cfg.architecture()
    chunks = build_model(arch, cfg.model, cfg.parallel)
    return cfg, chunks, WeightStreamer(chunks, arch, cfg.rollout.sglang)


def _sync_and_measure(cfg_dict: dict, engine_kind: str) -> dict:
    """On every rank: build the Megatron model, start a peak, sync once; the figures."""
    import gc

    import torch

    from repo_megatron.runtime.rss import (peak_rss_bytes, reset_peak_rss, return_freed_memory,
                                           rss_bytes)

    return_freed_memory()          # resident memory = live tensors (see its docstring)
    cfg, chunks, streamer = _megatron_streamer(cfg_dict)
    rank = torch.distributed.get_rank()
    engine, server = None, None
    if rank == 0:
        engine, server = _engine(cfg, engine_kind)
    gc.collect()
    reset_peak_rss()
    before = rss_bytes()
    try:
        streamer.sync(engine)
    finally:
        peak = peak_rss_bytes()
        if engine_kind == "sglang_disk" and rank == 0:
            engine.close()
            server.__exit__(None, None, None)
    shards = sum(p.numel() * p.element_size() for c in chunks for p in c.parameters())
    out = {"rank": rank, "shards": shards, "before": before, "peak": peak}
    if rank == 0 and engine_kind == "embedded":
        params = dict(engine.model.named_parameters())
        out["hf_bytes"] = sum(p.numel() * p.element_size() for p in params.values())
        out["untouched"] = sorted(n for n, p in params.items() if not p.detach().any())
        out["version"] = engine.weight_version
    return out


def _engine(cfg, kind):
    """Rank 0's engine: an embedded transformers model zeroed (so every loaded tensor shows),
    or an SGLangEngine on a recording worker in this process (disk sync)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if kind == "embedded":
        from repo_megatron.engines.embedded import HFEngine

        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg.model.hf_path))
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()

        class Tokenizer:
            eos_token_id, pad_token_id = 0, 0
        return HFEngine(model, Tokenizer()), None
    from repo_megatron.engines.sglang import SGLangEngine
    from tests.sglang.servers import RecordingWorker, free_ports, serve_in_thread

    server = serve_in_thread(RecordingWorker().app(), free_ports(1))
    url = server.__enter__()
    sg = cfg.rollout.sglang
    import dataclasses
    return SGLangEngine(dataclasses.replace(sg, urls=[url])), server


def _config(tmp_path, weight_sync: str) -> dict:
    model = big_llama(str(tmp_path / "big"))
    return tiny_run_config(model, str(tmp_path / "run"), parallel={
        "tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 2},
        rollout={"sglang": {"weight_bucket_mb": BUCKET_MB, "weight_sync": weight_sync,
                            "disk_dir": str(tmp_path / "sync")}})


def assert_bounded(results: list[dict]) -> None:
    bound = (2 * BUCKET_MB + OVERHEAD_MB) << 20
    print("rank, own shards MB, RSS before sync MB, growth during sync MB (bound "
          f"{bound >> 20} MB):")
    for r in results:
        print(f"  {r['rank']}, {r['shards'] / 2**20:.1f}, {r['before'] / 2**20:.0f}, "
              f"{(r['peak'] - r['before']) / 2**20:.1f}")
    for r in results:
        grown = r["peak"] - r["before"]
        assert grown <= bound, (f"rank {r['rank']}: resident memory grew {grown >> 20} MB during "
                                f"sync (own shards {r['shards'] >> 20} MB, bound "
                                f"{bound >> 20} MB)")


def test_sync_to_the_embedded_engine_at_tp2_pp2_stays_within_two_buckets(tmp_path):
    results = run_distributed(_sync_and_measure, 4, _config(tmp_path, "disk"), "embedded",
                              timeout=600)
    rank0 = results[0]
    # weights much larger than the bound really went through rank 0, and all of them
    assert rank0["hf_bytes"] > 4 * ((2 * BUCKET_MB + OVERHEAD_MB) << 20)
    assert rank0["untouched"] == [] and rank0["version"] == 1
    assert_bounded(results)


def test_disk_sync_writes_every_stage_shards_within_two_buckets(tmp_path):
    results = run_distributed(_sync_and_measure, 4, _config(tmp_path, "disk"), "sglang_disk",
                              timeout=600)
    assert_bounded(results)
    (version_dir,) = [d for d in os.listdir(tmp_path / "sync")]
    with open(tmp_path / "sync" / version_dir / "model.safetensors.index.json") as f:
        weight_map = json.load(f)["weight_map"]
    shards = set(weight_map.values())
    assert any(s.startswith("model-pp00-") for s in shards)
    assert any(s.startswith("model-pp01-") for s in shards)
    assert set(os.listdir(tmp_path / "sync" / version_dir)) == \
        shards | {"model.safetensors.index.json"}
    assert "lm_head.weight" in weight_map and "model.embed_tokens.weight" in weight_map
    assert len(weight_map) == 16 * 9 + 3


def _colocated_sync(cfg_dict: dict, worker_tp: int, workers: int) -> dict:
    """Rank 0 serves ``workers`` recording workers of engine TP ``worker_tp`` and plans a
    tensor (colocated) sync; every rank streams. Rank 0 returns what each worker received."""
    import dataclasses

    import torch

    from repo_megatron.engines.sglang import SGLangEngine
    from repo_megatron.engines.sglang_server.tensor_payload import deserialize, named_tensors
    from tests.sglang.servers import RecordingWorker, free_ports, serve_in_thread

    cfg, _, streamer = _megatron_streamer(cfg_dict)
    rank = torch.distributed.get_rank()
    urls = [None] * workers
    recorders, servers, engine = [], [], None
    if rank == 0:
        base = free_ports(workers)
        for i in range(workers):
            recorders.append(RecordingWorker(tp_size=worker_tp))
            servers.append(serve_in_thread(recorders[-1].app(), base + i))
            urls[i] = servers[-1].__enter__()
        engine = SGLangEngine(dataclasses.replace(cfg.rollout.sglang, urls=urls))
    try:
        streamer.sync(engine)
        streamer.sync(engine)
        if rank != 0:
            return {}
        received = {}
        for url, recorder in zip(urls, recorders):
            bodies = [b for e, b in recorder.calls if e == "/update_weights_from_tensor"]
            per_rank = [dict() for _ in range(worker_tp)]
            for body in bodies[:len(bodies) // 2]:               # the first sync
                assert len(body["serialized_named_tensors"]) == worker_tp
                for i, entry in enumerate(body["serialized_named_tensors"]):
                    per_rank[i].update(named_tensors(deserialize(entry), "flattened_bucket"))
            received[url] = {"ranks": per_rank, "version": engine.weight_version,
                             "endpoints": recorder.endpoints()}
        return received
    finally:
        if rank == 0:
            engine.close()
            for server in servers:
                server.__exit__(None, None, None)


@pytest.mark.parametrize("layout,worker_tp,workers", [
    ({"tensor_model_parallel_size": 2}, 2, 1),      # one engine of TP 2 on the two ranks
    ({"pipeline_model_parallel_size": 2}, 1, 2),    # two engines; stage 1 sends to stage 0
], ids=["tp2-one-engine", "pp2-two-engines"])
def test_colocated_sync_gives_each_engine_tp_rank_its_own_complete_entry(
        tmp_path, layout, worker_tp, workers):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model = write_tiny_llama(str(tmp_path / "model"), num_layers=2, vocab_size=512)
    cfg = tiny_run_config(model, str(tmp_path / "run"), parallel=layout,
                          rollout={"sglang": {"weight_sync": "tensor", "weight_bucket_mb": 1}})
    (received, _) = run_distributed(_colocated_sync, 2, cfg, worker_tp, workers, timeout=600)
    hf = dict(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model))
              .named_parameters())
    assert len(received) == workers
    for url, got in received.items():
        assert got["version"] == 2
        assert got["endpoints"].count("/continue_generation") == 2
        first = got["ranks"][0]
        assert set(first) == set(hf), url
        for name, tensor in first.items():
            assert tuple(tensor.shape) == tuple(hf[name].shape), name
        for other in got["ranks"][1:]:         # every TP rank's entry holds the same weights
            assert set(other) == set(first)
            assert all(torch.equal(other[n], first[n]) for n in first)
    if workers == 2:                           # both engines got identical weights
        a, b = (got["ranks"][0] for got in received.values())
        assert all(torch.equal(a[n], b[n]) for n in a)


WAIT_TIMEOUT_S = 3       # every process group but the control plane
ENGINE_DELAY_S = 8       # rank 0's engine loads its weights this long


def _other_ranks_wait_for_a_slow_engine(cfg_dict: dict) -> dict:
    """DP2: rank 1 has nothing to stream and waits for rank 0, whose engine is slower than
    every process group's timeout except the control plane's."""
    import time

    import torch
    from torch.distributed import distributed_c10d as c10d

    from repo_megatron.runtime import control

    cfg, chunks, streamer = _megatron_streamer(cfg_dict)
    for group in list(c10d._world.pg_map):
        if group is not control.group():
            c10d._set_pg_timeout(timedelta(seconds=WAIT_TIMEOUT_S), group)

    class SlowEngine:
        def update_weights(self, bucket, version):
            time.sleep(ENGINE_DELAY_S)
            self.version = version

    engine = SlowEngine() if torch.distributed.get_rank() == 0 else None
    streamer.sync(engine, version=1)
    timeout = streamer.group._get_backend(torch.device("cpu")).options._timeout
    return {"synced": getattr(engine, "version", None), "timeout": timeout}


def test_weight_sync_waits_on_the_control_plane_with_its_timeout(tmp_path):
    model = write_tiny_llama(str(tmp_path / "model"), num_layers=2)
    cfg = tiny_run_config(model, str(tmp_path / "run"),
                          parallel={"control_timeout_minutes": 7})
    rank0, rank1 = run_distributed(_other_ranks_wait_for_a_slow_engine, 2, cfg, timeout=300)
    assert rank0["synced"] == 1 and rank1["synced"] is None
    assert rank0["timeout"] == rank1["timeout"] == timedelta(minutes=7)
