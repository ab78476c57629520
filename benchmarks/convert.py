"""Benchmark: HF -> Megatron -> HF conversion of 70B-shaped layers, against `cp`.

Writes a synthetic bf16 Llama checkpoint with Llama-3-70B's layer shapes (hidden 8192, 64
heads, 8 KV heads, FFN 28672, vocab 128256) but only ``--layers`` layers (2: ~7.6 GB), then
times, with the page cache dropped before each run: ``cp`` of the HF directory (+ sync), the
``hf-to-megatron`` command and the ``megatron-to-hf`` command (each a fresh process, imports
included, files fsynced). Peak ``RssAnon`` of each conversion process is sampled from
/proc (ru_maxrss would count the memory-mapped file pages). Ends with one JSON line.

    python benchmarks/convert.py --workdir /work/bench-convert [--layers 2] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time

import torch

LLAMA3_70B = dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
                  num_key_value_heads=8, vocab_size=128256, head_dim=128)


def write_synthetic_checkpoint(directory: str, layers: int) -> tuple[int, int]:
    """A bf16 Llama checkpoint of random bits in 5 GB shards; (total bytes, largest tensor)."""
    from repo_megatron.models.weight_mapping import mappings_for, tensor_order
    from repo_megatron.convert.safetensors_io import PlannedTensor, write_safetensors
    from repo_megatron.models.architecture import parse_hf_config

    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
              "num_hidden_layers": layers, "max_position_embeddings": 8192,
              "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False,
              "torch_dtype": "bfloat16", **LLAMA3_70B}
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    arch = parse_hf_config(config)
    planned = [PlannedTensor(name, shape, torch.bfloat16)
               for m, layer in tensor_order(mappings_for(arch), arch.num_layers)
               for name, shape in zip(m.hf_names(layer), m.hf_shapes(arch))]
    gen = torch.Generator().manual_seed(0)

    def tensors():
        for t in planned:
            # Random 16-bit patterns (cheaper than randn; the bytes are all that is moved).
            data = torch.empty(t.shape, dtype=torch.int16)
            data.random_(-2**15, 2**15, generator=gen)
            yield t.name, data.view(torch.bfloat16)

    write_safetensors(directory, planned, tensors(), 5 * 2**30)
    return sum(t.nbytes for t in planned), max(t.nbytes for t in planned)


def drop_page_cache() -> bool:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def rss_anon(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def timed(cmd: list[str]) -> tuple[float, int]:
    """Wall time of ``cmd`` and the peak RssAnon of its process (sampled every 10 ms)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd)
    peak = [0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], rss_anon(proc.pid))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    code = proc.wait()
    elapsed = time.perf_counter() - start
    sampler.join()
    if code:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {code}")
    return elapsed, peak[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="Scratch directory (needs ~4x the model)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--keep", action="store_true", help="Keep the files afterwards")
    args = p.parse_args()
    hf, cp_dir, meg, back = (os.path.join(args.workdir, n) for n in ("hf", "cp", "megatron", "hf_back"))
    shutil.rmtree(args.workdir, ignore_errors=True)
    total, largest = write_synthetic_checkpoint(hf, args.layers)
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(args.workdir))).free
    if free < 3.2 * total:
        raise SystemExit(f"{free / 1e9:.1f} GB free, need ~{3.2 * total / 1e9:.1f}: use --layers 1")
    cli = [sys.executable, "-m", "repo_megatron.cli", "convert"]
    dropped = drop_page_cache()
    start = time.perf_counter()
    subprocess.run(["cp", "-r", hf, cp_dir], check=True)
    os.sync()
    t_cp = time.perf_counter() - start
    shutil.rmtree(cp_dir)
    drop_page_cache()
    t_import, rss_import = timed(cli + ["hf-to-megatron", "--hf", hf, "--out", meg])
    drop_page_cache()
    t_export, rss_export = timed(cli + ["megatron-to-hf", "--megatron", meg, "--out", back])
    if not args.keep:
        shutil.rmtree(args.workdir)
    gb = 1e9
    print(json.dumps({
        "model_gb": round(total / gb, 2), "layers": args.layers,
        "largest_tensor_gb": round(largest / gb, 3), "page_cache_dropped": dropped,
        "cp_s": round(t_cp, 2), "hf_to_megatron_s": round(t_import, 2),
        "megatron_to_hf_s": round(t_export, 2),
        "time_ratio_vs_cp": round(max(t_import, t_export) / t_cp, 2),
        "rss_anon_peak_gb": round(max(rss_import, rss_export) / gb, 3),
        "rss_anon_peak_vs_largest_tensor": round(max(rss_import, rss_export) / largest, 2),
        "rss_anon_hf_to_megatron_gb": round(rss_import / gb, 3),
        "rss_anon_megatron_to_hf_gb": round(rss_export / gb, 3),
    }))


if __name__ == "__main__":
    main()
