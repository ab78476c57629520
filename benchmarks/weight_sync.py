"""Throughput of the trainer side of weight sync against a memcpy of the same bytes.

For each TP size in ``--tp`` (gloo processes on CPU holding a Megatron Llama of ``--layers`` x
``--hidden``), each rank times ``WeightStreamer.stage_buckets`` (TP gather of every split
parameter, merge, HF renaming, grouping into ``--bucket-mb`` buckets: everything a sync does
before the transport to the engine) and, in the same run, a ``torch`` copy of exactly as many
bytes into a new buffer; memcpy_time / sync_time is the fraction of memcpy speed the sync
reaches (goal >= 0.7). Two more baselines, same run: the *transport*, i.e. the gathers our sync
issues (``TPGroup.start_gather``) on the raw shards with nothing else, which bounds any sync
on this backend, and torch's own ``all_gather`` of the same shards. Peak resident memory per
rank during the timed syncs is measured with glibc returning freed tensors (so it is the live
set; every new buffer then pays its page faults, as the memcpy's does). Best of
``--repeats``. Prints ONE JSON line last.

    python benchmarks/weight_sync.py [--tp 1,2] [--layers 8] [--hidden 1024] [--bucket-mb 64]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from repo_megatron.config import config_from_dict  # noqa: E402
from repo_megatron.runtime.launch import run_distributed  # noqa: E402


def llama_config(directory: str, layers: int, hidden: int) -> str:
    os.makedirs(directory, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "hidden_size": hidden, "intermediate_size": 2 * hidden,
              "num_hidden_layers": layers, "num_attention_heads": 16, "num_key_value_heads": 4,
              "head_dim": hidden // 16, "vocab_size": 8192, "max_position_embeddings": 256,
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
              "tie_word_embeddings": False, "torch_dtype": "float32"}
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    return directory


def split_shards(chunks: list) -> list:
    """This rank's shard of every TP-split parameter."""
    return [p.detach() for chunk in chunks for p in chunk.parameters()
            if getattr(p, "tensor_model_parallel", False)]


def transport(shards: list, tp) -> None:
    """The gathers the sync issues, one ahead as it does, results dropped."""
    pending = []
    for shard in shards:
        pending.append(tp.start_gather(shard)[2])
        if len(pending) > 1:
            for handle in pending.pop(0):
                handle.wait()
    for handles in pending:
        for handle in handles:
            handle.wait()


def torch_all_gathers(shards: list, tp) -> None:
    """torch.distributed.all_gather of the same shards into lists, results dropped."""
    import torch

    for shard in shards:
        torch.distributed.all_gather([torch.empty_like(shard) for _ in range(tp.size)], shard,
                                     group=tp.group)


def timed(fn) -> float:
    import torch

    torch.distributed.barrier()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(cfg_dict: dict, bucket_mb: int, repeats: int) -> dict:
    """One rank: best seconds of the sync and of each baseline over ``repeats``, bytes, peak
    RSS."""
    import torch

    from repo_megatron.config.rollout import SGLangConfig
    from repo_megatron.models.builder import build_model
    from repo_megatron.runtime import distributed
    from repo_megatron.runtime.rss import (peak_rss_bytes, reset_peak_rss, return_freed_memory,
                                           rss_bytes)
    from repo_megatron.weight_sync.plan import TPGroup
    from repo_megatron.weight_sync.streamer import WeightStreamer

    return_freed_memory()
    cfg = config_from_dict(cfg_dict)
    distributed.initialize(cfg.parallel, cfg.seed)
    arch = cfg.architecture()
    chunks = build_model(arch, cfg.model, cfg.parallel)
    streamer = WeightStreamer(chunks, arch, SGLangConfig(weight_bucket_mb=bucket_mb))
    tp = TPGroup.current()
    shards = split_shards(chunks) if tp.size > 1 else []
    times = {"sync_s": [], "memcpy_s": [], "transport_s": [], "torch_all_gather_s": []}
    nbytes, growth = 0, 0

    def sync() -> None:
        nonlocal nbytes
        nbytes = 0
        for bucket in streamer.stage_buckets():
            nbytes += sum(t.numel() * t.element_size() for _, t in bucket)
            del bucket

    reset_peak_rss()
    before = rss_bytes()
    for _ in range(repeats + 1):                      # the first round warms up
        times["sync_s"].append(timed(sync))
        growth = max(growth, peak_rss_bytes() - before)
        times["transport_s"].append(timed(lambda: transport(shards, tp)))
        times["torch_all_gather_s"].append(timed(lambda: torch_all_gathers(shards, tp)))
        src = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
        start = time.perf_counter()
        dst = torch.empty_like(src)
        dst.copy_(src)
        times["memcpy_s"].append(time.perf_counter() - start)
        del src, dst
        reset_peak_rss()
        before = rss_bytes()
    return {"rank": torch.distributed.get_rank(), "tp": tp.size, "bytes": nbytes,
            **{k: min(v[1:]) for k, v in times.items()},
            "peak_rss_mb": round((before + growth) / 2**20, 1),
            "growth_mb": round(growth / 2**20, 1)}


def layout_figures(ranks: list) -> dict:
    """The slowest rank's figures of one layout."""
    slowest = max(ranks, key=lambda r: r["sync_s"] / r["memcpy_s"])
    figures = {"sync_gb_per_s": round(slowest["bytes"] / slowest["sync_s"] / 1e9, 3),
               "memcpy_gb_per_s": round(slowest["bytes"] / slowest["memcpy_s"] / 1e9, 3),
               "ratio_vs_memcpy": round(slowest["memcpy_s"] / slowest["sync_s"], 3)}
    if slowest["tp"] > 1:
        figures.update({
            "transport_ratio_vs_memcpy": round(slowest["memcpy_s"] / slowest["transport_s"], 3),
            "ratio_vs_transport": round(slowest["transport_s"] / slowest["sync_s"], 3),
            "torch_all_gather_ratio_vs_memcpy": round(
                slowest["memcpy_s"] / slowest["torch_all_gather_s"], 3)})
    return {**figures, "peak_rss_mb_per_rank": [r["peak_rss_mb"] for r in ranks],
            "sync_growth_mb_per_rank": [r["growth_mb"] for r in ranks]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tp", default="1,2", help="comma-separated TP sizes, one run each")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--bucket-mb", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    tps = [int(t) for t in args.tp.split(",")]
    with open("/proc/loadavg") as f:
        load_start = f.read().split()[0]
    layouts, model_mb = {}, None
    with tempfile.TemporaryDirectory() as tmp:
        model = llama_config(os.path.join(tmp, "model"), args.layers, args.hidden)
        data = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples",
                            "data", "arith_train.jsonl")
        for tp in tps:
            cfg = {"run_dir": os.path.join(tmp, f"run-tp{tp}"),
                   "model": {"hf_path": model, "random_init": True, "transformer_impl": "local"},
                   "parallel": {"tensor_model_parallel_size": tp},
                   "data": {"path": data}, "logging": {"tensorboard": False}}
            config_from_dict(cfg)                          # fail here, not in every rank
            ranks = run_distributed(measure, tp, cfg, args.bucket_mb, args.repeats,
                                    timeout=1800)
            for r in ranks:
                print(f"TP{tp} rank {r['rank']}: {r['bytes'] / 2**20:.0f} MB in "
                      f"{r['sync_s']:.3f} s (memcpy {r['memcpy_s']:.3f} s, transport "
                      f"{r['transport_s']:.3f} s, torch all_gather {r['torch_all_gather_s']:.3f}"
                      f" s), peak RSS {r['peak_rss_mb']} MB (+{r['growth_mb']} MB during sync)")
            layouts[f"TP{tp}"] = layout_figures(ranks)
            model_mb = round(ranks[0]["bytes"] / 2**20, 1)
    with open("/proc/loadavg") as f:
        load_end = f.read().split()[0]
    # The headline is the largest TP: the layout with the most transport in it.
    head = layouts[f"TP{max(tps)}"]
    print(json.dumps({
        "benchmark": "weight_sync", "backend": "gloo CPU", "model_mb": model_mb,
        "bucket_mb": args.bucket_mb, "headline_layout": f"TP{max(tps)}",
        "ratio_vs_memcpy": head["ratio_vs_memcpy"], "goal": 0.7,
        "meets_goal": head["ratio_vs_memcpy"] >= 0.7,
        "transport_ratio_vs_memcpy": head.get("transport_ratio_vs_memcpy"),
        "ratio_vs_transport": head.get("ratio_vs_transport"),
        "peak_rss_mb_per_rank": head["peak_rss_mb_per_rank"],
        "layouts": layouts, "loadavg_start_end": [load_start, load_end]}))


if __name__ == "__main__":
    main()
