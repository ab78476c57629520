"""Throughput of the trainer side of weight sync against a memcpy of the same bytes.

On ``--tp`` gloo processes (CPU) holding a Megatron Llama of ``--layers`` x ``--hidden``, each
rank times ``stage_buckets`` (TP all-gather of every parameter, HF renaming, grouping into
``--bucket-mb`` buckets: everything a sync does before the transport) and, in the same run, a
``torch`` copy of exactly as many bytes; the ratio memcpy_time / sync_time is the fraction of
memcpy speed the sync reaches (goal >= 0.7). A second baseline is the transport alone: the
same TP all-gathers of the raw shards with nothing else, so what our code adds on top of the
collective shows separately (on CPU, gloo's loopback TCP is far slower than memcpy). Peak resident memory per rank during the timed
syncs is measured with glibc returning freed tensors (so it is the live set). Best of
``--repeats``. Prints ONE JSON line last.

    python benchmarks/weight_sync.py [--tp 2] [--layers 8] [--hidden 1024] [--bucket-mb 64]
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


def raw_all_gathers(chunks: list) -> None:
    """The TP all-gather of every TP-sharded parameter, results dropped: the transport floor."""
    import torch
    from megatron.core import parallel_state as ps

    group, size = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size()
    for chunk in chunks:
        for param in chunk.parameters():
            if size > 1 and getattr(param, "tensor_model_parallel", False):
                shards = [torch.empty_like(param) for _ in range(size)]
                torch.distributed.all_gather(shards, param.detach(), group=group)


def measure(cfg_dict: dict, bucket_mb: int, repeats: int) -> dict:
    """One rank: best sync and memcpy seconds over ``repeats``, bytes, peak RSS."""
    import torch

    from repo_megatron.models.builder import build_model
    from repo_megatron.runtime import distributed
    from repo_megatron.runtime.rss import (peak_rss_bytes, reset_peak_rss, return_freed_memory,
                                           rss_bytes)
    from repo_megatron.train.engine_sync import stage_buckets

    return_freed_memory()
    cfg = config_from_dict(cfg_dict)
    distributed.initialize(cfg.parallel, cfg.seed)
    arch = cfg.architecture()
    chunks = build_model(arch, cfg.model, cfg.parallel)
    sync_s, copy_s, gather_s, nbytes, growth = [], [], [], 0, 0
    reset_peak_rss()
    before = rss_bytes()
    for _ in range(repeats + 1):                      # the first round warms up
        torch.distributed.barrier()
        start = time.perf_counter()
        nbytes = 0
        for bucket in stage_buckets(chunks, arch, bucket_mb << 20):
            nbytes += sum(t.numel() * t.element_size() for _, t in bucket)
            del bucket
        sync_s.append(time.perf_counter() - start)
        growth = max(growth, peak_rss_bytes() - before)
        torch.distributed.barrier()
        start = time.perf_counter()
        raw_all_gathers(chunks)
        gather_s.append(time.perf_counter() - start)
        src = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
        dst = torch.empty_like(src)
        start = time.perf_counter()
        dst.copy_(src)
        copy_s.append(time.perf_counter() - start)
        del src, dst
        reset_peak_rss()
        before = rss_bytes()
    return {"rank": torch.distributed.get_rank(), "bytes": nbytes,
            "sync_s": min(sync_s[1:]), "memcpy_s": min(copy_s[1:]),
            "all_gather_s": min(gather_s[1:]),
            "peak_rss_mb": round((before + growth) / 2**20, 1),
            "growth_mb": round(growth / 2**20, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--bucket-mb", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with open("/proc/loadavg") as f:
        load_start = f.read().split()[0]
    with tempfile.TemporaryDirectory() as tmp:
        model = llama_config(os.path.join(tmp, "model"), args.layers, args.hidden)
        data = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples",
                            "data", "arith_train.jsonl")
        cfg = {"run_dir": os.path.join(tmp, "run"),
               "model": {"hf_path": model, "random_init": True, "transformer_impl": "local"},
               "parallel": {"tensor_model_parallel_size": args.tp},
               "data": {"path": data}, "logging": {"tensorboard": False}}
        config_from_dict(cfg)                          # fail here, not in every rank
        ranks = run_distributed(measure, args.tp, cfg, args.bucket_mb, args.repeats,
                                timeout=1800)
    with open("/proc/loadavg") as f:
        load_end = f.read().split()[0]
    for r in ranks:
        print(f"rank {r['rank']}: {r['bytes'] / 2**20:.0f} MB in {r['sync_s']:.3f} s "
              f"(memcpy {r['memcpy_s']:.3f} s, bare all-gathers {r['all_gather_s']:.3f} s), peak RSS {r['peak_rss_mb']} MB "
              f"(+{r['growth_mb']} MB during sync)")
    slowest = max(ranks, key=lambda r: r["sync_s"] / r["memcpy_s"])
    ratio = slowest["memcpy_s"] / slowest["sync_s"]
    print(json.dumps({
        "benchmark": "weight_sync", "layout": f"TP{args.tp} gloo CPU",
        "model_mb": round(sum(r["bytes"] for r in ranks[:1]) / 2**20, 1),
        "bucket_mb": args.bucket_mb,
        "sync_gb_per_s": round(slowest["bytes"] / slowest["sync_s"] / 1e9, 3),
        "memcpy_gb_per_s": round(slowest["bytes"] / slowest["memcpy_s"] / 1e9, 3),
        "ratio_vs_memcpy": round(ratio, 3), "goal": 0.7, "meets_goal": ratio >= 0.7,
        "ratio_vs_bare_all_gather": round(slowest["all_gather_s"] / slowest["sync_s"], 3),
        "peak_rss_mb_per_rank": [r["peak_rss_mb"] for r in ranks],
        "sync_growth_mb_per_rank": [r["growth_mb"] for r in ranks],
        "loadavg_start_end": [load_start, load_end]}))


if __name__ == "__main__":
    main()
