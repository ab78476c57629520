"""``repo-megatron plan CONFIG [key=value ...] [--gpu-memory-gb 80] [--measure]``: the per-GPU
memory of a config's layout, as a table, and a non-zero exit with the numbers when it does not
fit; with ``--measure`` also the memory measured on the real shapes, beside the plan, ending
with one JSON line.

The arithmetic is in :mod:`repo_megatron.plan.memory` (formulas in ``docs/scale_out.md``), the
measurement in :mod:`repo_megatron.plan.measure`; this module reads the config into a layout
and a workload, checks divisibility and prints.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Optional

from ..config import Config, ConfigError, load_config
from ..models.architecture import Architecture, padded_vocab_size
from ..models.fp8 import check_fp8, fp8_padded_length
from ..runtime.distributed import data_parallel_size
from .memory import (GIB, Colocation, Layout, StageMemory, Workload, kv_cache_tokens,
                     max_mem_fraction_static, plan_stages)

PARAMS_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config")
    parser.add_argument("overrides", nargs="*", help="key.path=value overrides")
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0,
                        help="Memory of one GPU in GiB (default 80)")
    parser.add_argument("--nodes", type=int, default=None,
                        help="Trainer nodes; DP = nodes x GPUs per node / (TP x PP) (default: "
                             "the fewest nodes that hold one model replica)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    parser.add_argument("--reserve-gb", type=float, default=5.0,
                        help="GiB kept for the CUDA context, NCCL buffers and allocator "
                             "fragmentation (default 5)")
    parser.add_argument("--sglang-mem-fraction", type=float, default=None,
                        help="SGLang servers share the trainer's GPUs with this "
                             "--mem-fraction-static (one server per node with TP = GPUs per "
                             "node); with weight_sync=tensor the default is the one in "
                             "rollout.sglang.launch.args")
    parser.add_argument("--measure", action="store_true",
                        help="Also run two training steps and the weight sync of the first "
                             "and the last pipeline rank at full size on the meta device and "
                             "print the memory their tensors took beside the plan, then one "
                             "JSON line (about half a minute on 2 cores)")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)  # checks heads, KV heads, layers vs layout
    arch = cfg.architecture()
    check_fp8(cfg.model, cfg.parallel, arch.num_layers)
    nodes = args.nodes or math.ceil(cfg.parallel.model_parallel_size / args.gpus_per_node)
    layout = layout_of(cfg, nodes * args.gpus_per_node)
    colocation = colocation_of(cfg, args.sglang_mem_fraction, args.gpus_per_node)
    work = workload_of(cfg, layout)
    vocab = padded_vocab_size(arch.vocab_size, cfg.model.make_vocab_size_divisible_by,
                              layout.tensor)
    gpu_bytes = args.gpu_memory_gb * GIB
    stages = plan_stages(arch, vocab, layout, work, gpu_bytes, args.reserve_gb * GIB, colocation)
    print(format_plan(args.config, cfg, arch, vocab, layout, work, stages, gpu_bytes,
                      args.gpus_per_node, colocation))
    if args.measure:
        from .measure import measure_plan

        measured = measure_plan(cfg, layout, work)
        print(format_measured(cfg, stages, measured))
        print(json.dumps(measured_summary(args.config, stages, measured)))
    check_fits(stages, gpu_bytes, layout, work.recompute, args.config)
    return 0


def layout_of(cfg: Config, world_size: int) -> Layout:
    """The trainer's layout on ``world_size`` GPUs (a ConfigError when TP x PP does not
    divide it)."""
    p = cfg.parallel
    return Layout(tensor=p.tensor_model_parallel_size, pipeline=p.pipeline_model_parallel_size,
                  virtual=p.virtual_pipeline_model_parallel_size,
                  data=data_parallel_size(world_size, p), sequence_parallel=p.sequence_parallel,
                  distributed_optimizer=cfg.optimizer.use_distributed_optimizer)


def sglang_mem_fraction(server_args: list[str]) -> Optional[float]:
    """The value of ``--mem-fraction-static`` in SGLang server arguments, if present."""
    for i, arg in enumerate(server_args):
        if arg.startswith("--mem-fraction-static="):
            return float(arg.split("=", 1)[1])
        if arg == "--mem-fraction-static" and i + 1 < len(server_args):
            return float(server_args[i + 1])
    return None


def colocation_of(cfg: Config, mem_fraction: Optional[float], gpus_per_node: int):
    """SGLang on the trainer's GPUs, or None: with ``--sglang-mem-fraction``, or with tensor
    weight sync (which only works colocated), taking the fraction from the servers' arguments
    ``rollout.sglang.launch.args``."""
    if mem_fraction is None and cfg.rollout.sglang.weight_sync != "tensor":
        return None
    if mem_fraction is None:
        mem_fraction = sglang_mem_fraction(cfg.rollout.sglang.launch.args)
    if mem_fraction is None:
        raise ConfigError("rollout.sglang.weight_sync=tensor means SGLang is colocated with "
                          "the trainer: set --mem-fraction-static in "
                          "rollout.sglang.launch.args (or pass --sglang-mem-fraction) to plan "
                          "its memory")
    if not 0 < mem_fraction < 1:
        raise ConfigError(f"SGLang --mem-fraction-static={mem_fraction} must be between 0 and 1")
    sglang = cfg.rollout.sglang
    return Colocation(mem_fraction_static=mem_fraction, engine_tp=gpus_per_node,
                      releases=sglang.releases_memory,
                      trainer_offloaded=sglang.trainer_offload != "off")


def workload_of(cfg: Config, layout: Layout) -> Workload:
    """Sequence length (longest prompt + response, FP8-padded), micro-batches per DP rank.
    With ``algorithm.max_tokens_per_microbatch`` the worst micro-batch the budget admits
    (run/batching.py): as many longest sequences as fit (at least one), or, packed, one row
    of the budget (at least the longest sequence); their count as if every sequence were the
    longest."""
    seq = cfg.data.max_prompt_tokens + cfg.rollout.max_new_tokens
    alg = cfg.algorithm
    if alg.max_tokens_per_microbatch is not None and alg.sequence_packing:
        seq = max(seq, alg.max_tokens_per_microbatch)
    if cfg.model.fp8 is not None:
        seq = fp8_padded_length(seq, cfg.model.fp8_recipe, layout.tensor, layout.sequence_parallel)
    mbs = alg.micro_batch_size
    if alg.max_tokens_per_microbatch is not None:
        mbs = 1 if alg.sequence_packing else max(1, alg.max_tokens_per_microbatch // seq)
    global_batch = (cfg.algorithm.global_batch_size
                    or cfg.rollout.prompts_per_step * cfg.rollout.group_size)
    sglang = cfg.rollout.sglang
    return Workload(seq_length=seq, micro_batch_size=mbs,
                    num_micro_batches=math.ceil(global_batch / (mbs * layout.data)),
                    recompute=cfg.model.recompute_granularity,
                    params_bytes=PARAMS_BYTES[cfg.model.params_dtype],
                    reference_model=cfg.algorithm.kl_coef > 0,
                    # auto is Transformer Engine on a GPU, the machine the plan is for
                    fused_kernels=cfg.model.transformer_impl != "local",
                    sync_bucket_bytes=sglang.weight_bucket_mb << 20,
                    sync_flattens=sglang.weight_sync == "tensor")


def passed_checks(arch: Architecture, layout: Layout) -> str:
    """What the divisibility checks of :func:`~repo_megatron.config.check_layout` verified."""
    chunks = layout.pipeline * (layout.virtual or 1)
    return (f"{arch.num_attention_heads} heads and {arch.num_query_groups} KV heads divisible "
            f"by TP {layout.tensor}; {arch.num_layers} layers = {chunks} (PP x virtual PP) "
            f"chunks of {arch.num_layers // chunks}")


def format_plan(path: str, cfg: Config, arch: Architecture, vocab: int, layout: Layout,
                work: Workload, stages: list[StageMemory], gpu_bytes: float, gpus_per_node: int,
                colocation: Optional[Colocation]) -> str:
    """The header (model, layout, workload, checks) and one column per stage, in GiB."""
    world = layout.tensor * layout.pipeline * layout.data
    features = [f for f, on in (("sequence parallel", layout.sequence_parallel),
                                ("distributed optimizer", layout.distributed_optimizer)) if on]
    fp8 = f", fp8 {cfg.model.fp8} ({cfg.model.fp8_recipe})" if cfg.model.fp8 else ""
    lines = [
        f"Memory plan of {path}",
        f"  model     {arch.hf_architecture}: {arch.num_layers} layers, hidden "
        f"{arch.hidden_size}, FFN {arch.ffn_hidden_size}, {arch.num_attention_heads} heads / "
        f"{arch.num_query_groups} KV heads",
        f"  vocab     {arch.vocab_size} padded to {vocab} (a multiple of "
        f"{cfg.model.make_vocab_size_divisible_by} x TP {layout.tensor})",
        f"  layout    TP {layout.tensor} x PP {layout.pipeline}"
        + (f" (virtual {layout.virtual})" if layout.virtual else "")
        + f" x DP {layout.data} = {world} GPUs ({world // gpus_per_node} x "
          f"{gpus_per_node}-GPU nodes)" + "".join(f", {f}" for f in features),
        f"  workload  sequence {work.seq_length} (prompt {cfg.data.max_prompt_tokens} + response "
        f"{cfg.rollout.max_new_tokens}), micro-batch {work.micro_batch_size}, "
        f"{work.num_micro_batches} micro-batches per DP rank, recompute "
        f"{work.recompute or 'none'}, {cfg.model.params_dtype}{fp8}",
        f"  checks    {passed_checks(arch, layout)}",
        "",
    ]
    dtype = cfg.model.params_dtype
    rows = [
        ("parameters (millions)", [s.params / 1e6 for s in stages], "{:.1f}"),
        (f"weights ({dtype})", [s.weights for s in stages], None),
        ("gradients (fp32)", [s.gradients for s in stages], None),
        ("optimizer (fp32 master, Adam m, v)" + (f" / DP {layout.data}"
                                                 if layout.distributed_optimizer else ""),
         [s.optimizer for s in stages], None),
        ("micro-batches in flight", [s.in_flight for s in stages], "{:.2f}"),
        ("activations", [s.activations for s in stages], None),
        ("logits + log-probs", [s.logits for s in stages], None),
        ("backward temporaries", [s.backward for s in stages], None),
    ]
    if work.reference_model:
        rows.append(("reference model (KL)", [s.reference for s in stages], None))
    rows += [(f"weight sync ({cfg.rollout.sglang.weight_sync}, after the step)",
              [s.weight_sync for s in stages], None),
             ("trainer peak (state + the larger of step and sync)",
              [s.trainer for s in stages], None)]
    if colocation:
        tokens = kv_cache_tokens(arch, stages[0].sglang_kv_cache, colocation.engine_tp)
        rows += [(f"SGLang weights (TP {colocation.engine_tp})",
                  [s.sglang_weights for s in stages], None),
                 (f"SGLang KV cache ({tokens} tokens)", [s.sglang_kv_cache for s in stages], None)]
    rows.append(("reserve (CUDA context, NCCL, allocator)", [s.reserve for s in stages], None))
    if colocation:
        trainer = "trainer offloaded" if colocation.trainer_offloaded else "trainer state"
        sglang = "SGLang released" if colocation.releases else "SGLang resident"
        rows += [(f"rollout phase (SGLang weights + KV cache, {trainer})",
                  [s.rollout_phase for s in stages], None),
                 (f"train phase (trainer state + step, {sglang})",
                  [s.train_phase for s in stages], None),
                 ("sync phase (trainer state + sync, SGLang weights"
                  + ("" if colocation.releases else " + KV cache") + ")",
                  [s.sync_phase for s in stages], None)]
    rows.append((f"total of {gpu_bytes / GIB:g} GiB (the largest phase)" if colocation else
                 f"total of {gpu_bytes / GIB:g} GiB", [s.total for s in stages], None))
    lines += format_rows("per GPU, GiB", [s.stage for s in stages],
                         [(label, [(form or "{:.2f}").format(v if form else v / GIB)
                                   for v in values]) for label, values, form in rows])
    if colocation:
        ceiling = min(max_mem_fraction_static(s, gpu_bytes) for s in stages)
        lines.append(f"SGLang --mem-fraction-static can go up to {ceiling:.2f} (now "
                     f"{colocation.mem_fraction_static:g}): the rollout phase then fills the GPU "
                     f"(at start-up the engines release their share before any rank builds "
                     f"the trainer)")
    peak = max(stages, key=lambda s: s.total)
    if peak.total <= gpu_bytes:
        lines.append(f"fits: peak {peak.total / GIB:.1f} GiB on the {peak.stage}, "
                     f"{(gpu_bytes - peak.total) / GIB:.1f} GiB to spare")
    return "\n".join(lines)


def format_rows(title: str, columns: list[str], rows: list[tuple[str, list[str]]],
                width: int = 14) -> list[str]:
    """A table of ``rows`` (label, cells) under ``columns``."""
    label_width = max(len(label) for label, _ in rows) + 2
    lines = [title.ljust(label_width) + "".join(c.rjust(width) for c in columns)]
    lines += [label.ljust(label_width) + "".join(c.rjust(width) for c in cells)
              for label, cells in rows]
    return lines


# (JSON key, row, planned StageMemory attribute or None: the plan has none, MeasuredStage's)
COMPARED = [
    ("weights", "weights", "weights", "weights"),
    ("gradients", "gradients (fp32 buffers)", "gradients", "gradients"),
    ("optimizer", "optimizer (main params, Adam m, v)", "optimizer", "optimizer"),
    ("reference", "reference model (KL)", "reference", "reference"),
    ("activations", "activations", "activations", "activations"),
    ("logits", "logits + log-probs", "logits", "logits"),
    ("backward", "backward temporaries", "backward", "backward"),
    ("optimizer_step", "optimizer step temporaries", None, "optimizer_step"),
    ("weight_sync", "weight sync", "weight_sync", "weight_sync"),
    ("trainer_peak", "trainer peak", "trainer", "peak"),
]


def _compared(plan: StageMemory, meas) -> list[tuple[str, str, float, float]]:
    """(key, row, planned bytes, measured bytes) of one stage, with the activations of one
    micro-batch in flight (in units of the stage's layers) after the activations."""
    rows = [(key, label, getattr(plan, p) if p else 0.0, getattr(meas, m))
            for key, label, p, m in COMPARED]
    rows.insert(5, ("activations_per_micro_batch", "  per micro-batch in flight",
                    plan.activations / plan.in_flight, meas.activations / plan.in_flight))
    return rows


def format_measured(cfg: Config, stages: list[StageMemory], measured: list) -> str:
    """The plan and the measurement side by side, item by item, per stage."""
    columns, cells = [], {}
    for plan, meas in zip(stages, measured):
        columns += [f"{plan.stage}: plan", "measured", "ratio"]
        for _, label, planned, value in _compared(plan, meas):
            cells.setdefault(label, []).extend([
                f"{planned / GIB:.2f}", f"{value / GIB:.2f}",
                f"{value / planned:.3f}" if planned else "-"])
    notes = [
        f"Measured: one rank per stage (TP 0, DP 0) at full size on the meta device, two "
        f"training steps of {measured[0].micro_batches} full-length micro-batches (the "
        f"second reported) and the weight sync, in {sum(m.seconds for m in measured):.0f} s. "
        "Not measurable there, left to the reserve: the CUDA context, NCCL buffers, allocator "
        "rounding and fragmentation, TE workspaces"
        + (", FP8 weights and scales (measured in bf16)" if cfg.model.fp8 else "") + ".",
        "Optimizer step temporaries: torch's AdamW here (Megatron's fallback without TE or "
        "apex); TE's FusedAdam on GPUs makes none, so the plan has none.",
    ]
    return "\n".join(["", *format_rows("measured, GiB", columns, list(cells.items()), 20),
                      "", *notes])


def measured_summary(path: str, stages: list[StageMemory], measured: list) -> dict:
    """The JSON summary: the fullest stage's measured and planned trainer peaks (the plan
    without its reserve and SGLang share, which the measurement cannot see) and per stage,
    per item."""
    per_stage = {}
    for plan, meas in zip(stages, measured):
        per_stage[plan.stage] = {
            "measured_peak_gib": _gib(meas.peak), "planned_peak_gib": _gib(plan.trainer),
            "ratio": round(meas.peak / plan.trainer, 3), "peak_phase": meas.peak_phase,
            "phase_peaks_gib": {phase: _gib(v) for phase, v in meas.phase_peaks.items()},
            "items": {key: {"planned_gib": _gib(planned), "measured_gib": _gib(value)}
                      for key, _, planned, value in _compared(plan, meas)}}
    measured_peak = max(m.peak for m in measured)
    planned_peak = max(s.trainer for s in stages)
    return {"config": path, "measured_peak_gib": _gib(measured_peak),
            "planned_peak_gib": _gib(planned_peak),
            "ratio": round(measured_peak / planned_peak, 3),
            "planned_total_gib": _gib(max(s.total for s in stages)),
            "stages": per_stage}


def _gib(value: float) -> float:
    return round(value / GIB, 3)


def check_fits(stages: list[StageMemory], gpu_bytes: float, layout: Layout,
               recompute: Optional[str], source: Optional[str] = None) -> None:
    """ConfigError with the numbers when the fullest stage exceeds one GPU."""
    peak = max(stages, key=lambda s: s.total)
    if peak.total <= gpu_bytes:
        return
    # the items of the peak: the state, then the step or the weight sync, whichever is larger
    items = [(name, getattr(peak, name)) for name in ("weights", "gradients", "optimizer",
                                                      "reference", "sglang_weights",
                                                      "sglang_kv_cache")]
    items.insert(4, ("step (activations, logits, temporaries)", peak.step)
                 if peak.step >= peak.weight_sync else ("weight sync", peak.weight_sync))
    parts = ", ".join(f"{name.replace('_', ' ')} {value / GIB:.1f}" for name, value in items
                      if value)
    levers = ["raise parallel.tensor_model_parallel_size or "
              "parallel.pipeline_model_parallel_size"]
    levers.append("add nodes (a larger DP shards the optimizer states)"
                  if layout.distributed_optimizer else
                  "set optimizer.use_distributed_optimizer=true")
    if recompute != "full":
        levers.append("set model.recompute_granularity=full")
    raise ConfigError(
        f"parallel layout TP={layout.tensor} x PP={layout.pipeline} x DP={layout.data} does not "
        f"fit: the {peak.stage} needs {peak.total / GIB:.1f} GiB per GPU ({parts} GiB, plus "
        f"{peak.reserve / GIB:.1f} reserve) but a GPU has {gpu_bytes / GIB:g} GiB; "
        + ", or ".join(levers), source)
