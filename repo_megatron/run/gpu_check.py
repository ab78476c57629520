"""``python -m repo_megatron.run.gpu_check``: what one GPU can show of the GPU path, in minutes.

``scripts/gpu_check.sh`` makes the environment (a venv over the machine's torch, megatron-core
from the wheelhouse) and runs this driver; ``docs/gpu_check.md`` says what each check proves
and what it cannot. The checks:

- ``trainer_step``: the dry run's step (:func:`.dry_run.run_step`: build, synthetic rollout
  groups, old and reference log-probs, the loss through Megatron's schedule and two optimizer
  steps, weight sync into a sink engine, checkpoint save and load) for real on CUDA at TP1,
  world size 1, on a random Llama in bf16, with the peak GPU memory (``max_memory_allocated``)
  of every phase beside the planner's estimate for the same config;
- ``te_fp8``: the same step on the Transformer Engine spec with FP8 (e4m3; tensorwise scaling
  on Hopper and newer, delayed on Ada), where ``transformer_engine`` imports;
- ``sglang_ipc``: colocated weight sync's payload: a bucket of CUDA tensors serialised by
  :func:`~repo_megatron.weight_sync.flattened_bucket.bucket_payloads` (CUDA-IPC
  handles) and rebuilt in a second process by SGLang's own deserialiser and
  ``FlattenedTensorBucket``, where ``sglang`` imports.

It prints one line per check, ``check NAME: ran|skipped|failed (why) figures``, then one JSON
line ``{"gpu_check": ..., "checks": {...}}``, and exits non-zero only when a check that ran
failed. Without a CUDA GPU every check is skipped ("no CUDA GPU"); ``GPU_CHECK_ALLOW_CPU=1``
runs ``trainer_step`` on the CPU instead (gloo, the dry run's tiny model: seconds), so the
driver is exercised where there is no GPU. Each check runs in a process of its own (its memory
peak is its own, and a crash in CUDA or Transformer Engine fails that check, not the driver)
within what is left of ``--budget-s``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Callable, Optional

MODULE = "repo_megatron.run.gpu_check"   # run as python -m MODULE (also as __main__)
CHECKS = ("trainer_step", "te_fp8", "sglang_ipc")
ALLOW_CPU = "GPU_CHECK_ALLOW_CPU"
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Shape:
    """The random Llama of a trainer check and the step pushed through it."""
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    prompts: int
    group_size: int
    max_new_tokens: int
    micro_batch: int


# On a GPU: big enough that activations and logits show in the memory figures, small enough
# for seconds. On a CPU (GPU_CHECK_ALLOW_CPU=1): the dry run's size.
GPU_SHAPE = Shape(layers=4, hidden=512, heads=8, kv_heads=4, ffn=1408, vocab=32000,
                  prompts=8, group_size=8, max_new_tokens=256, micro_batch=8)
CPU_SHAPE = Shape(layers=2, hidden=64, heads=4, kv_heads=2, ffn=128, vocab=1000,
                  prompts=4, group_size=4, max_new_tokens=16, micro_batch=4)
MAX_PROMPT_TOKENS = 12   # the synthetic groups' longest prompt (dry_run.synthetic_groups)


class CheckFailed(Exception):
    """A check ran and found the GPU path wrong."""


class Skip(Exception):
    """A check cannot run here; the message says why."""


# ---- what runs where -------------------------------------------------------------------------

def gpu_or_skip(allow_cpu: bool = False) -> bool:
    """Whether a CUDA GPU is here (False: the CPU, when ``allow_cpu``); raises Skip otherwise."""
    try:
        from ..runtime import cpu_compat
    except ImportError as e:
        raise Skip(f"no CUDA GPU (torch does not import: {e})") from e
    if cpu_compat.has_gpu():
        return True
    if allow_cpu:
        return False
    raise Skip("no CUDA GPU")


def import_or_skip(module: str, what: str) -> None:
    """Import ``module``; raises Skip naming ``what`` and the error when it does not import."""
    try:
        importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 -- a half-installed TE raises OSError, not ImportError
        raise Skip(f"{what} does not import ({type(e).__name__}: {str(e).splitlines()[0]})") from e


def fp8_recipe_for(capability: tuple[int, int]) -> str:
    """The FP8 scaling recipe this card runs (``docs``: :mod:`repo_megatron.models.fp8`):
    tensorwise on Hopper (sm90) and newer, delayed on Ada (sm89); Skip below."""
    if tuple(capability) >= (9, 0):
        return "tensorwise"
    if tuple(capability) >= (8, 9):
        return "delayed"
    raise Skip(f"FP8 needs compute capability 8.9 or newer; this GPU has "
               f"{capability[0]}.{capability[1]}")


# ---- the trainer step ------------------------------------------------------------------------

def write_llama_config(directory: str, shape: Shape) -> str:
    """A Llama ``config.json`` of ``shape`` (random weights: no other file is needed)."""
    os.makedirs(directory, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "hidden_size": shape.hidden, "intermediate_size": shape.ffn,
              "num_hidden_layers": shape.layers, "num_attention_heads": shape.heads,
              "num_key_value_heads": shape.kv_heads, "head_dim": shape.hidden // shape.heads,
              "vocab_size": shape.vocab, "max_position_embeddings": 4096,
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
              "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    return directory


def check_config(root: str, shape: Shape, fp8_recipe: Optional[str] = None):
    """The trainer check's config: TP1, one rank, bf16, two optimizer steps per rollout step
    (so old log-probs are a forward of their own) and a KL term (so the reference model is
    built and run); the Transformer Engine spec with FP8 when ``fp8_recipe`` is given."""
    from ..config import config_from_dict

    sequences = shape.prompts * shape.group_size
    model = {"hf_path": write_llama_config(os.path.join(root, "model"), shape),
             "random_init": True, "params_dtype": "bf16", "transformer_impl": "local"}
    if fp8_recipe is not None:
        model.update(transformer_impl="transformer_engine", fp8="e4m3", fp8_recipe=fp8_recipe)
    return config_from_dict({
        "run_dir": os.path.join(root, "run"), "seed": 1, "train_steps": 1, "model": model,
        "rollout": {"engine": "embedded", "prompts_per_step": shape.prompts,
                    "group_size": shape.group_size, "max_new_tokens": shape.max_new_tokens},
        "algorithm": {"micro_batch_size": shape.micro_batch,
                      "global_batch_size": sequences // 2, "kl_coef": 0.001},
        "data": {"max_prompt_tokens": MAX_PROMPT_TOKENS},
        "checkpoint": {"hf_export_at_end": False},
        "logging": {"tensorboard": False, "progress_bar": False, "level": "WARNING"},
    }, source="repo_megatron.run.gpu_check")


class PhasePeaks:
    """``phase(name)`` for :func:`~.dry_run.run_step`: per phase, the GPU memory held when it
    starts, its peak (the peak is reset at its start) and its wall time."""

    def __init__(self):
        self.phases: dict[str, dict] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        from ..runtime import cpu_compat

        cpu_compat.synchronize()
        cpu_compat.reset_peak_memory()
        start, t0 = cpu_compat.memory_allocated(), time.perf_counter()
        yield
        cpu_compat.synchronize()
        self.phases[name] = {"start_bytes": start,
                             "peak_bytes": cpu_compat.max_memory_allocated(),
                             "seconds": round(time.perf_counter() - t0, 3)}


def planner_estimate(cfg, gpu_bytes: float) -> dict:
    """Bytes per GPU that ``repo-megatron plan`` predicts for ``cfg`` on one GPU, by part.

    The seam for a better estimate: this is the planner's arithmetic
    (:mod:`repo_megatron.plan.memory`); a measured estimate of the same config (e.g. the
    model and step on meta tensors) replaces the body of this function, and the figures it
    returns keep these keys."""
    from ..models.architecture import padded_vocab_size
    from ..plan.command import layout_of, workload_of
    from ..plan.memory import plan_stages

    arch = cfg.architecture()
    layout = layout_of(cfg, world_size=1)
    vocab = padded_vocab_size(arch.vocab_size, cfg.model.make_vocab_size_divisible_by,
                              layout.tensor)
    (stage,) = plan_stages(arch, vocab, layout, workload_of(cfg, layout), gpu_bytes,
                           reserve_bytes=0)
    # the trainer's peak: its state with the larger of the step's largest moment (activations
    # in flight, logits, temporaries) and the weight sync's buckets
    parts = ("weights", "gradients", "optimizer", "reference", "step", "weight_sync")
    return {"source": "repo_megatron.plan.memory", "total_bytes": int(stage.trainer),
            **{f"{p}_bytes": int(getattr(stage, p)) for p in parts}}


def trainer_step(fp8_recipe: Optional[str] = None, allow_cpu: bool = False) -> dict:
    """Run the dry run's step on this device (see the module docstring); the figures of
    every phase, the planner's estimate and the step's verdict. Raises CheckFailed when the
    step went wrong (the dry run's own checks: the weight sync delivered every parameter, the
    checkpoint brought the weights and optimizer state back)."""
    from ..runtime import cpu_compat
    from .dry_run import run_step, verdict

    on_gpu = gpu_or_skip(allow_cpu)
    shape = GPU_SHAPE if on_gpu else CPU_SHAPE
    peaks = PhasePeaks()
    gpu = cpu_compat.gpu_description()
    with tempfile.TemporaryDirectory(prefix="repo-gpu-check-") as tmp:
        cfg = check_config(tmp, shape, fp8_recipe)
        result = run_step(cfg, "WARNING", phase=peaks)
        problems = verdict([result], cfg)
        estimate = planner_estimate(cfg, gpu["memory_bytes"] if gpu else 80 * GIB)
    if not 0 < result["grad_norm"] < float("inf"):   # NaN fails too
        problems.append(f"the gradient norm is {result['grad_norm']}: the step trained nothing")
    if problems:
        raise CheckFailed("; ".join(problems))
    return {"device": gpu["name"] if gpu else "cpu", "shape": dataclasses.asdict(shape),
            "fp8_recipe": fp8_recipe, "parameters": result["params"], "loss": result["loss"],
            "grad_norm": result["grad_norm"], "seconds": round(result["seconds"], 1),
            "phases": peaks.phases,
            "estimate": estimate}


def te_fp8() -> dict:
    """:func:`trainer_step` on the Transformer Engine spec in FP8."""
    from ..runtime import cpu_compat

    gpu_or_skip()
    import_or_skip("transformer_engine.pytorch", "transformer_engine")
    return trainer_step(fp8_recipe=fp8_recipe_for(cpu_compat.gpu_description()["capability"]))


# ---- colocated weight sync into SGLang ---------------------------------------------------------

def sglang_ipc(timeout_s: float = 300) -> dict:
    """A bucket of CUDA tensors (two dtypes) serialised as colocated weight sync sends it, then
    rebuilt by SGLang's deserialiser in another process; every tensor must come back on the
    same GPU with the same bytes."""
    import torch

    from ..runtime import cpu_compat
    from ..weight_sync.flattened_bucket import bucket_payloads, sglang_ipc as ipc

    gpu_or_skip()
    if ipc() is None:
        raise Skip("sglang does not import (colocated weight sync needs it in the trainer)")
    device = cpu_compat.device()
    generator = torch.Generator(device=device).manual_seed(0)
    bucket = [(name, torch.randn(shape, generator=generator, device=device).to(dtype))
              for name, shape, dtype in (
                  ("model.embed_tokens.weight", (32000, 512), torch.bfloat16),
                  ("model.layers.0.self_attn.qkv_proj.weight", (1024, 512), torch.bfloat16),
                  ("model.layers.0.input_layernorm.weight", (512,), torch.float32))]
    payloads = bucket_payloads(bucket)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(payloads, f)
    try:
        t0 = time.perf_counter()
        # the bucket stays alive here while the other process maps its memory
        rebuilt = json.loads(subprocess.run(
            [sys.executable, "-m", MODULE, "--rebuild-sglang", f.name], check=True,
            capture_output=True, text=True, timeout=timeout_s).stdout.splitlines()[-1])
        seconds = time.perf_counter() - t0
    except subprocess.CalledProcessError as e:
        raise CheckFailed(f"SGLang's side failed: {(e.stderr.strip().splitlines() or ['?'])[-1]}")
    finally:
        os.unlink(f.name)
    problems = []
    for name, tensor in bucket:
        got = rebuilt.get(name)
        want = tensor_description(tensor)
        if got is None:
            problems.append(f"{name} did not arrive")
        elif got != want:   # on another device: not mapped through CUDA-IPC
            problems.append(f"{name}: sent {want}, SGLang rebuilt {got}")
    if problems:
        raise CheckFailed("; ".join(problems))
    return {"payloads": len(payloads), "tensors": len(bucket),
            "bytes": sum(t.numel() * t.element_size() for _, t in bucket),
            "seconds": round(seconds, 1)}


def rebuild_sglang(path: str) -> dict:
    """The other process of :func:`sglang_ipc`: each payload through SGLang's
    ``MultiprocessingSerializer.deserialize`` (its ``SafeUnpickler``) and rebuilt as its
    ``_update_weights_from_flattened_bucket`` does; :func:`tensor_description` of each."""
    from sglang.srt.utils import MultiprocessingSerializer
    from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
    from sglang.srt.weight_sync.tensor_bucket import (FlattenedTensorBucket,
                                                      FlattenedTensorMetadata)

    monkey_patch_torch_reductions()
    with open(path) as f:
        payloads = json.load(f)
    out = {}
    for payload in payloads:
        data = MultiprocessingSerializer.deserialize(payload)
        metadata = [FlattenedTensorMetadata(name=m.name, shape=m.shape, dtype=m.dtype,
                                            start_idx=m.start_idx, end_idx=m.end_idx,
                                            numel=m.numel) for m in data["metadata"]]
        bucket = FlattenedTensorBucket(flattened_tensor=data["flattened_tensor"],
                                       metadata=metadata)
        for name, tensor in bucket.reconstruct_tensors():
            out[name] = tensor_description(tensor)
    return out


def tensor_description(tensor) -> dict:
    """Device, shape, dtype and the SHA-256 of the bytes of ``tensor``: equal on both sides
    of a transfer that delivered it exactly."""
    import torch

    data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy()
    return {"device": str(tensor.device), "shape": list(tensor.shape), "dtype": str(tensor.dtype),
            "sha256": hashlib.sha256(data).hexdigest()}


# ---- the driver --------------------------------------------------------------------------------

def run_check(name: str, timeout_s: float) -> dict:
    """One check, in this process: ``{"status": "ran"|"skipped"|"failed", "why", ...}``."""
    allow_cpu = os.environ.get(ALLOW_CPU) == "1"
    checks: dict[str, Callable[[], dict]] = {
        "trainer_step": lambda: trainer_step(allow_cpu=allow_cpu),
        "te_fp8": te_fp8,
        "sglang_ipc": lambda: sglang_ipc(timeout_s),
    }
    try:
        return {"status": "ran", **checks[name]()}
    except Skip as e:
        return {"status": "skipped", "why": str(e)}
    except CheckFailed as e:
        return {"status": "failed", "why": str(e)}
    except Exception as e:  # noqa: BLE001 -- any error of the GPU path is this check's finding
        from ..checkpoint.manager import one_line
        return {"status": "failed", "why": one_line(e)}


def run_isolated(name: str, timeout_s: float) -> dict:
    """:func:`run_check` in a process of its own, killed after ``timeout_s``."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        try:
            proc = subprocess.run([sys.executable, "-m", MODULE, "--check", name, "--out",
                                   out.name, "--timeout-s", str(timeout_s)],
                                  capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"status": "failed", "why": f"still running after {timeout_s:.0f} s "
                                               "(the time budget)"}
        with open(out.name) as f:
            text = f.read()
    if not text:   # the process died before it could say (a CUDA or TE abort)
        tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        return {"status": "failed", "why": f"the check's process died: {tail}"}
    return json.loads(text)


def summary_line(name: str, result: dict) -> str:
    """``check NAME: ran|skipped|failed (why) figures``."""
    status = result["status"]
    if status != "ran":
        return f"check {name}: {status} ({result['why']})"
    if "phases" in result:
        shape = result["shape"]
        phases = ", ".join(f"{p} {v['peak_bytes'] / GIB:.2f}" for p, v in result["phases"].items())
        est = result["estimate"]
        fp8 = f", FP8 e4m3 {result['fp8_recipe']}" if result["fp8_recipe"] else ""
        return (f"check {name}: ran ({result['device']}, bf16{fp8}, TP1, {shape['layers']} "
                f"layers x hidden {shape['hidden']}, {result['parameters'] / 1e6:.1f}M "
                f"parameters, loss {result['loss']:.4f}, {result['seconds']} s) peak GiB per "
                f"phase: {phases}; planner estimate {est['total_bytes'] / GIB:.2f} GiB")
    return (f"check {name}: ran ({result['tensors']} tensors, {result['bytes'] / 2**20:.1f} MiB "
            f"in {result['payloads']} payloads rebuilt by SGLang in another process, "
            f"{result['seconds']} s)")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget-s", type=float, default=420,
                        help="Seconds for every check together (default 420)")
    parser.add_argument("--only", nargs="*", choices=CHECKS, help="Run only these checks")
    parser.add_argument("--check", choices=CHECKS, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--timeout-s", type=float, default=300, help=argparse.SUPPRESS)
    parser.add_argument("--rebuild-sglang", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rebuild_sglang:
        print(json.dumps(rebuild_sglang(args.rebuild_sglang)))
        return 0
    if args.check:
        result = run_check(args.check, args.timeout_s)
        with open(args.out, "w") as f:
            json.dump(result, f)
        return 0

    deadline = time.monotonic() + args.budget_s
    results, device = {}, None
    for name in args.only or CHECKS:
        try:   # decided here, without a process per check, when no check can run
            gpu_or_skip(allow_cpu=name == "trainer_step" and os.environ.get(ALLOW_CPU) == "1")
        except Skip as e:
            results[name] = {"status": "skipped", "why": str(e)}
        else:
            left = deadline - time.monotonic()
            results[name] = (run_isolated(name, left) if left > 10 else
                             {"status": "skipped", "why": "no time left of the budget"})
        print(summary_line(name, results[name]), flush=True)
    if any(r["status"] != "skipped" for r in results.values()):
        from ..runtime import cpu_compat
        device = cpu_compat.gpu_description()
    failed = [n for n, r in results.items() if r["status"] == "failed"]
    verdict = "failed" if failed else ("passed" if any(r["status"] == "ran"
                                                       for r in results.values()) else "skipped")
    print(json.dumps({"gpu_check": verdict, "device": device, "checks": results}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
