"""Benchmark: HF -> Megatron -> HF conversion of 70B-shaped layers, against `cp`.

Writes a synthetic bf16 Llama checkpoint with Llama-3-70B's layer shapes (hidden 8192, 64
heads, 8 KV heads, FFN 28672, vocab 128256) but only ``--layers`` layers (2: ~7.6 GB), then,
``--repeats`` times, with the page cache dropped before each step: ``cp -r`` of the HF
directory + ``sync`` (the floor: the same bytes read and written by the kernel), the
``hf-to-megatron`` command and the ``megatron-to-hf`` command (each a fresh process, imports
included, output fsynced). The round's ratio is the slower conversion over its own ``cp``
(taken in the same round, so a busier disk slows both). Peak ``RssAnon`` of each conversion
process is sampled from /proc (ru_maxrss would count mapped file pages). The exported model is
checked bitwise against the input. Ends with one JSON line (median and every round).

    python benchmarks/convert.py [--workdir DIR] [--layers 2] [--repeats 3] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import torch

LLAMA3_70B = dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
                  num_key_value_heads=8, vocab_size=128256, head_dim=128)


def write_synthetic_checkpoint(directory: str, layers: int) -> tuple[int, int]:
    """A bf16 Llama checkpoint of random bits in 5 GB shards; (total bytes, largest tensor)."""
    from repo_megatron.convert.safetensors_io import PlannedTensor, write_safetensors
    from repo_megatron.models.architecture import parse_hf_config
    from repo_megatron.models.weight_mapping import mappings_for, tensor_order

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

    write_safetensors(directory, tensors(), 5 * 2**30, planned=planned)
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
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
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


def same_files(a: str, b: str) -> bool:
    """Whether the safetensors tensors of two model directories are bitwise identical."""
    from repo_megatron.convert.safetensors_io import SafetensorsCheckpoint, same_bytes

    sa, sb = SafetensorsCheckpoint(a), SafetensorsCheckpoint(b)
    return sa.files.keys() == sb.files.keys() and all(
        same_bytes(sa.location(n), sb.location(n)) for n in sa.files)


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def one_round(hf: str, workdir: str) -> dict:
    cp_dir, meg, back = (os.path.join(workdir, n) for n in ("cp", "megatron", "hf_back"))
    for d in (cp_dir, meg, back):
        shutil.rmtree(d, ignore_errors=True)
    cli = [sys.executable, "-m", "repo_megatron.cli", "convert"]
    drop_page_cache()
    start = time.perf_counter()
    subprocess.run(["cp", "-r", hf, cp_dir], check=True)
    os.sync()
    t_cp = time.perf_counter() - start
    shutil.rmtree(cp_dir)
    drop_page_cache()
    t_import, rss_import = timed(cli + ["hf-to-megatron", "--hf", hf, "--out", meg,
                                        "--no-progress"])
    drop_page_cache()
    t_export, rss_export = timed(cli + ["megatron-to-hf", "--megatron", meg, "--out", back,
                                        "--no-progress"])
    return {"cp_s": round(t_cp, 2), "hf_to_megatron_s": round(t_import, 2),
            "megatron_to_hf_s": round(t_export, 2),
            "time_ratio_vs_cp": round(max(t_import, t_export) / t_cp, 3),
            "rss_anon_peak": max(rss_import, rss_export)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default=None,
                   help="Scratch directory (needs ~4x the model; default: a new temporary "
                        "directory, deleted afterwards)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="Rounds of cp / import / export")
    p.add_argument("--keep", action="store_true", help="Keep the files afterwards")
    args = p.parse_args()
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench-convert-")
    os.makedirs(workdir, exist_ok=True)
    load_start = loadavg()
    dropped = drop_page_cache()
    try:
        hf = os.path.join(workdir, "hf")
        shutil.rmtree(hf, ignore_errors=True)
        total, largest = write_synthetic_checkpoint(hf, args.layers)
        free = shutil.disk_usage(workdir).free
        if free < 2.2 * total:
            raise SystemExit(f"{free / 1e9:.1f} GB free in {workdir}, need "
                             f"~{2.2 * total / 1e9:.1f}: use --layers 1")
        rounds = [one_round(hf, workdir) for _ in range(args.repeats)]
        identical = same_files(hf, os.path.join(workdir, "hf_back"))
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    gb = 1e9
    ratios = [r["time_ratio_vs_cp"] for r in rounds]
    peak = max(r.pop("rss_anon_peak") for r in rounds)
    print(json.dumps({
        "model_gb": round(total / gb, 2), "layers": args.layers,
        "largest_tensor_gb": round(largest / gb, 3), "page_cache_dropped": dropped,
        "time_ratio_vs_cp": round(statistics.median(ratios), 3),
        "time_ratio_vs_cp_min": min(ratios), "time_ratio_vs_cp_max": max(ratios),
        "rss_anon_peak_gb": round(peak / gb, 3),
        "rss_anon_peak_vs_largest_tensor": round(peak / largest, 3),
        "roundtrip_bitwise_identical": identical,
        "loadavg_start": load_start, "loadavg_end": loadavg(), "rounds": rounds,
    }))


if __name__ == "__main__":
    main()
