"""Benchmark: vocab-parallel chunked log-probs + entropy against the naive full-vocabulary path.

    python benchmarks/logprobs.py [--tokens 8192] [--vocab 151936] [--tp 1 2]

For each TP size the script re-launches itself under ``torch.distributed.run`` (gloo, one
thread per rank). Each rank holds random bf16 logits ``[T, V/tp]`` (what a bf16 model emits)
and computes, forward, the log-probs of random targets and the entropies, in fp32:

- ours: :func:`repo_megatron.trainer.logprobs.vocab_parallel_logprobs` (token chunks, TP
  all-reduces of per-token statistics, never the full vocabulary);
- naive: megatron's all-gather of the vocabulary, ``log_softmax`` over ``[T, V]`` in fp32,
  gather the targets, entropy ``-sum exp(logp) logp``.

Memory: torch's CPU tensors are invisible to tracemalloc, and torch keeps no CPU allocator
statistics, so the peak is read from the kernel: ``/proc/self/clear_refs`` ("5") resets the
peak resident set (VmHWM) before a measurement, and peak extra memory = VmHWM after it minus
VmRSS before it. Large tensors are ``mmap``-ed by glibc and unmapped when freed, so this is
the peak of the live tensors (plus any heap the allocator keeps, counted against us).
Under TP=2 the naive path would hold ~12 GiB per rank; to fit two ranks on one machine, the
ranks take turns for its compute after the all-gather (each rank is timed on its own turn).

Also reported (not in the targets): our forward + backward peak extra memory, beyond the
``[T, V/tp]`` gradient of the logits that any method must produce; the largest difference
between the two paths; and the error of each against float64 on the first 64 tokens.
Prints a table, then ONE JSON line with the headline figures.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

import torch


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def measure(fn):
    """(result, seconds, peak extra MiB) of ``fn()``."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _status_kib("VmRSS")
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    return result, seconds, (_status_kib("VmHWM") - base) / 1024


def ours(logits: torch.Tensor, targets: torch.Tensor):
    from repo_megatron.trainer.logprobs import vocab_parallel_logprobs

    with torch.no_grad():
        logp, entropy = vocab_parallel_logprobs(logits[None], targets[None])   # [1, T]
    return logp[0], entropy[0]


def naive(logits: torch.Tensor, targets: torch.Tensor):
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    full = gather_from_tensor_model_parallel_region(logits)                    # [T, V]
    logp_all = torch.log_softmax(full.float(), dim=-1)
    del full
    logp = logp_all.gather(-1, targets[:, None])[:, 0]
    entropy = -torch.einsum("tv,tv->t", logp_all.exp(), logp_all)
    return logp, entropy


def ours_forward_backward(logits: torch.Tensor, targets: torch.Tensor):
    from repo_megatron.trainer.logprobs import vocab_parallel_logprobs

    logits = logits.detach().requires_grad_(True)
    logp, entropy = vocab_parallel_logprobs(logits[None], targets[None])
    (logp + entropy).sum().backward()
    return logits.grad


def worker(tokens: int, vocab: int, out_dir: str) -> None:
    """One rank: measure both paths on this rank's shard, write the figures as JSON."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from repo_megatron.config.parallel import ParallelConfig
    from repo_megatron.runtime.distributed import initialize

    torch.set_num_threads(1)
    tp = int(os.environ["WORLD_SIZE"])
    initialize(ParallelConfig(tensor_model_parallel_size=tp))
    rank = parallel_state.get_tensor_model_parallel_rank()
    g = torch.Generator().manual_seed(rank)
    logits = torch.empty(tokens, vocab // tp, dtype=torch.bfloat16)           # [T, V/tp]
    for rows in logits.split(256):  # no full-size fp32 temporary
        rows.copy_(2 * torch.randn(rows.shape, generator=g))
    targets = torch.randint(0, vocab, (tokens,), generator=torch.Generator().manual_seed(99))

    # Warm-up on a few tokens: lazy imports and first-call set-up are not what is measured.
    ours(logits[:8], targets[:8])
    naive(logits[:8], targets[:8])
    torch.distributed.barrier()
    (logp, entropy), ours_s, ours_mib = measure(lambda: ours(logits, targets))
    torch.distributed.barrier()
    for turn in range(tp):
        if turn == rank:
            (ref_logp, ref_entropy), naive_s, naive_mib = measure(lambda: naive(logits, targets))
        else:  # take part in the all-gather only
            gather_from_tensor_model_parallel_region(logits)
        torch.distributed.barrier()
    grad, _, fwd_bwd_mib = measure(lambda: ours_forward_backward(logits, targets))
    # Accuracy of both against float64 on the first tokens (the same bf16 logits).
    head = gather_from_tensor_model_parallel_region(logits[:64]).double()     # [64, V]
    logp64_all = torch.log_softmax(head, dim=-1)
    logp64 = logp64_all.gather(-1, targets[:64, None])[:, 0]
    entropy64 = -(logp64_all.exp() * logp64_all).sum(-1)
    grad_mib = grad.numel() * grad.element_size() / 2**20
    result = {
        "rank": rank, "ours_s": ours_s, "naive_s": naive_s, "ours_peak_mib": ours_mib,
        "naive_peak_mib": naive_mib, "ours_fwd_bwd_peak_mib_beyond_grad": fwd_bwd_mib - grad_mib,
        "max_abs_diff_logp": (logp - ref_logp).abs().max().item(),
        "max_abs_diff_entropy": (entropy - ref_entropy).abs().max().item(),
        **{f"{name}_err_vs_fp64_{what}": (value[:64] - exact).abs().max().item()
           for name, lp, h in (("ours", logp, entropy), ("naive", ref_logp, ref_entropy))
           for what, value, exact in (("logp", lp, logp64), ("entropy", h, entropy64))},
    }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


def run_tp(tp: int, tokens: int, vocab: int) -> dict:
    """Launch ``tp`` ranks and combine their figures (worst rank for time and memory)."""
    with tempfile.TemporaryDirectory() as out:
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(
                   os.path.abspath(__file__))), os.environ.get("PYTHONPATH", "")])}
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                        str(tp), "--master-port", str(29600 + tp), os.path.abspath(__file__),
                        "--worker", "--tokens", str(tokens), "--vocab", str(vocab),
                        "--out", out], check=True, env=env)
        ranks = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(tp)]
    worst = {k: max(r[k] for r in ranks) for k in ranks[0] if k != "rank"}
    worst["time_ratio"] = worst["ours_s"] / worst["naive_s"]
    worst["memory_ratio"] = worst["ours_peak_mib"] / worst["naive_peak_mib"]
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.tokens, args.vocab, args.out)
        return
    results = {f"tp{tp}": run_tp(tp, args.tokens, args.vocab) for tp in args.tp}
    print(f"T={args.tokens} V={args.vocab} bf16 logits, fp32 maths, forward log-probs + entropy")
    print(f"{'':5} {'ours s':>8} {'naive s':>8} {'time':>6} {'ours MiB':>9} {'naive MiB':>10} "
          f"{'memory':>7} {'fwd+bwd MiB':>12}")
    for name, r in results.items():
        print(f"{name:5} {r['ours_s']:8.2f} {r['naive_s']:8.2f} {r['time_ratio']:6.2f} "
              f"{r['ours_peak_mib']:9.0f} {r['naive_peak_mib']:10.0f} {r['memory_ratio']:7.3f} "
              f"{r['ours_fwd_bwd_peak_mib_beyond_grad']:12.0f}")
    headline = {"benchmark": "logprobs", "tokens": args.tokens, "vocab": args.vocab,
                "logits_dtype": "bf16",
                **{f"{name}_{k}": float(f"{v:.4g}") for name, r in results.items() for k, v in r.items()},
                "targets_met": all(r["memory_ratio"] <= 1 / 8 and r["time_ratio"] <= 1.0
                                   for r in results.values())}
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
