"""Trainer offload of a colocated run (``rollout.sglang.offload_trainer: host``): what leaves the
device while SGLang generates, how long the round trip takes, and whether it comes back bit for
bit.

Two gloo ranks (TP 2) on the CPU hold a 112.9M-parameter Llama (``weight_sync.py``'s model:
20 x 768, FFN 1536, 16 heads / 4 KV heads, 8k vocabulary, untied) in bf16 with fp32 main
weights and the distributed optimizer, the 70B colocated config's precision. They run
device-faithful (repo_megatron.runtime.device_faithful):
the trainer's tensors are *device* tensors, the host buffer is host memory, as on a GPU. After
one RePO step (so Adam's state exists) each rank times ``HostOffload.offload`` and ``restore``
``--cycles`` times (the first offload, which allocates the host buffer, apart) and measures:

- the trainer state (weights, gradient buffers, main weights, Adam) and the bytes freed: every
  counted storage emptied; freed_fraction = freed / state;
- cross-checks: the drop of resident memory at each offload (on a CPU the "device" storages
  are this process's memory; glibc returns freed blocks) and the device storages still
  reachable after the offload (``device_bytes_held``: what is not trainer state);
- bitwise: SHA-256 of every kept storage before the first offload and after the last restore,
  and the gradient buffers zero;
- baselines, same run, the same bytes in one buffer instead of one storage at a time: copy the
  kept bytes into the host buffer and free the state's bytes (the least an offload does);
  allocate the state's bytes, copy the kept bytes in and zero the rest (the least a restore
  does).

On a CPU an offload is a memcpy into the host buffer plus a free, and a restore an allocation
(page faults) plus a memcpy; a GPU's figures are PCIe's, which only a GPU run measures. Prints a
table and ONE JSON line last.

    python benchmarks/offload.py [--layers 20] [--hidden 768] [--cycles 5]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from functools import partial

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from repo_megatron.config import config_from_dict  # noqa: E402
from repo_megatron.runtime.launch import run_distributed  # noqa: E402
from repo_megatron.run.dry_run import RANK_IMPORTS, expected_parameters  # noqa: E402
from weight_sync import llama_config  # noqa: E402  (this directory: the same test model)

GIB = 2 ** 30


def kept_digests(offloader) -> list[str]:
    """SHA-256 of every storage that must come back (all but the gradient buffers)."""
    from repo_megatron.trainer.offload_state import storage_bytes

    return [hashlib.sha256(storage_bytes(s.storage).cpu().numpy().data).hexdigest()
            for s in offloader.state() if s.keep]


def gradients_zero(offloader) -> bool:
    from repo_megatron.trainer.offload_state import storage_bytes

    return all(not bool(storage_bytes(s.storage).any())
               for s in offloader.state() if not s.keep)


def measure(cfg_dict: dict, cycles: int) -> dict:
    """One rank: a RePO step, then ``cycles`` offload/restore round trips."""
    import torch

    from repo_megatron.runtime import cpu_compat
    from repo_megatron.runtime.rss import return_freed_memory, rss_bytes
    from repo_megatron.run.dry_run import SyntheticRollout
    from repo_megatron.run.session import Session
    from repo_megatron.trainer.offload_host import HostOffload
    from repo_megatron.trainer.offload_state import device_bytes_held

    return_freed_memory()       # freed blocks leave the process: RSS tracks the live tensors
    cpu_compat.enable(device_faithful=True)
    cfg = config_from_dict(cfg_dict)
    session = Session(cfg, rollout=partial(SyntheticRollout, cfg))
    try:
        t0 = time.perf_counter()
        groups, _ = session.rollout(1)
        session.update(session.prepare(groups))
        step_s = time.perf_counter() - t0
        offloader = HostOffload(session.trainer.model, session.trainer.optimizer,
                                session.reference)
        before = kept_digests(offloader)
        held_resident = device_bytes_held()
        offload_s, restore_s, rss_drops, reports, emptied = [], [], [], [], True
        for _ in range(cycles + 1):                    # the first allocates the host buffer
            state = offloader.state()
            torch.distributed.barrier()
            rss = rss_bytes()
            reports.append(offloader.offload())
            rss_drops.append(rss - rss_bytes())
            offload_s.append(reports[-1].seconds)
            held_offloaded = device_bytes_held()
            emptied = emptied and all(s.storage.nbytes() == 0 for s in state)
            del state
            torch.distributed.barrier()
            restore_s.append(offloader.restore())
        # Baselines, the same bytes in one buffer: a restore's least work (allocate the state,
        # copy the kept bytes in, zero the gradients' share) and an offload's (copy the kept
        # bytes out, free the state).
        host, total = offloader.host_buffer, reports[-1].state_bytes
        kept = reports[-1].copied_bytes
        alloc_copy_s, copy_free_s = [], []
        for _ in range(cycles):
            start = time.perf_counter()
            fresh = torch.empty(total, dtype=torch.uint8)
            fresh[:kept].copy_(host)
            fresh[kept:].zero_()
            alloc_copy_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            host.copy_(fresh[:kept])
            del fresh
            copy_free_s.append(time.perf_counter() - start)
        report = reports[-1]
        return {
            "rank": torch.distributed.get_rank(),
            "params": sum(p.numel() for c in session.chunks for p in c.parameters()),  # shard
            "state_bytes": report.state_bytes, "freed_bytes": report.freed_bytes,
            "copied_bytes": report.copied_bytes, "by_kind": report.by_kind,
            "workspace_bytes": report.workspace_bytes, "emptied": emptied,
            "host_buffer_bytes": offloader.host_buffer.numel(),
            "held_resident": held_resident, "held_offloaded": held_offloaded,
            "rss_drop": statistics.median(rss_drops[1:]),
            "first_offload_s": offload_s[0], "offload_s": statistics.median(offload_s[1:]),
            "restore_s": statistics.median(restore_s[1:]), "step_s": step_s,
            "copy_free_s": statistics.median(copy_free_s),
            "alloc_copy_s": statistics.median(alloc_copy_s),
            "bitwise": kept_digests(offloader) == before,
            "gradients_zero": gradients_zero(offloader),
            "device_faithful": cpu_compat.device_faithful()}
    finally:
        session.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--cycles", type=int, default=5, help="timed round trips (median)")
    args = parser.parse_args()
    with open("/proc/loadavg") as f:
        load_start = f.read().split()[0]
    with tempfile.TemporaryDirectory() as tmp:
        model = llama_config(os.path.join(tmp, "model"), args.layers, args.hidden)
        cfg = {"run_dir": os.path.join(tmp, "run"), "seed": 1,
               "model": {"hf_path": model, "random_init": True, "transformer_impl": "local",
                         "params_dtype": "bf16"},
               "parallel": {"tensor_model_parallel_size": 2},
               "optimizer": {"use_distributed_optimizer": True},
               "rollout": {"prompts_per_step": 4, "group_size": 4, "max_new_tokens": 16},
               "algorithm": {"injection": "repo", "micro_batch_size": 4},
               "logging": {"tensorboard": False}}
        params = expected_parameters(config_from_dict(cfg))  # fail here, not in every rank
        ranks = run_distributed(measure, 2, cfg, args.cycles, timeout=1800,
                                preload=RANK_IMPORTS)
    with open("/proc/loadavg") as f:
        load_end = f.read().split()[0]
    print("rank  params       state     freed     kept on host  RSS drop  left on device  "
          "first offload  offload  restore")
    for r in ranks:
        print(f"{r['rank']:4d}  {r['params'] / 1e6:6.1f}M  {r['state_bytes'] / GIB:6.3f} GiB"
              f"  {r['freed_bytes'] / GIB:6.3f} GiB  {r['copied_bytes'] / GIB:6.3f} GiB"
              f"  {r['rss_drop'] / GIB:6.3f} GiB  {r['held_offloaded'] / 2**20:8.2f} MiB"
              f"  {r['first_offload_s']:9.3f} s  {r['offload_s']:6.3f} s  {r['restore_s']:6.3f} s")
    state = sum(r["state_bytes"] for r in ranks)
    freed = sum(r["freed_bytes"] for r in ranks)
    slowest_offload = max(r["offload_s"] for r in ranks)
    slowest_restore = max(r["restore_s"] for r in ranks)
    print(json.dumps({
        "benchmark": "offload", "strategy": "host", "backend": "gloo CPU, device-faithful",
        "layout": "TP2", "precision": "bf16, fp32 main weights, distributed optimizer",
        "params": params,
        "state_gib": round(state / GIB, 4),
        "by_kind_gib": {k: round(sum(r["by_kind"][k] for r in ranks) / GIB, 4)
                        for k in ranks[0]["by_kind"]},
        "freed_fraction": freed / state,
        "every_storage_emptied": all(r["emptied"] for r in ranks),
        "rss_freed_fraction": round(sum(r["rss_drop"] for r in ranks) / state, 4),
        "left_on_device_mib": round(sum(r["held_offloaded"] for r in ranks) / 2**20, 3),
        "left_on_device_fraction": round(sum(r["held_offloaded"] for r in ranks)
                                         / sum(r["held_resident"] for r in ranks), 6),
        "host_buffer_gib": round(sum(r["host_buffer_bytes"] for r in ranks) / GIB, 4),
        "restore_bitwise": all(r["bitwise"] and r["gradients_zero"] for r in ranks),
        "offload_s": round(slowest_offload, 4), "restore_s": round(slowest_restore, 4),
        "first_offload_s": round(max(r["first_offload_s"] for r in ranks), 4),
        "baseline_copy_free_s": round(max(r["copy_free_s"] for r in ranks), 4),
        "baseline_alloc_copy_s": round(max(r["alloc_copy_s"] for r in ranks), 4),
        "offload_vs_baseline": round(slowest_offload / max(r["copy_free_s"] for r in ranks), 3),
        "restore_vs_baseline": round(slowest_restore / max(r["alloc_copy_s"] for r in ranks), 3),
        "offload_gb_per_s": round(max(r["copied_bytes"] for r in ranks) / slowest_offload / 1e9, 3),
        "restore_gb_per_s": round(max(r["copied_bytes"] for r in ranks) / slowest_restore / 1e9, 3),
        "step_s": round(max(r["step_s"] for r in ranks), 2), "cycles": args.cycles,
        "device_faithful": all(r["device_faithful"] for r in ranks),
        "loadavg_start_end": [load_start, load_end]}))


if __name__ == "__main__":
    main()
