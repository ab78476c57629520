"""Per-GPU memory of a training layout, in bytes: pure arithmetic, no torch, no Megatron.

Every formula is documented (with its assumptions) in ``docs/scale_out.md``; the sources:

- weights, gradients and optimizer states: Megatron-LM ``docs/distrib_optimizer.md`` (bf16
  parameters with fp32 gradient accumulation: 2 + 4 bytes per parameter, plus 12 bytes of
  fp32 master copy and Adam m, v, divided over DP by the distributed optimizer);
- activations: Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
  Transformer Models" (arXiv 2205.05198), Sections 4-5;
- micro-batches in flight: the warm-up counts of Megatron-Core's 1F1B and interleaved
  schedules (``pipeline_parallel/schedules.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

from ..models.architecture import Architecture

GIB = 2**30
FP32 = 4
# fp32 [chunk, vocab/TP] buffers the chunked vocab-parallel log-probs hold at once
# (repo_megatron/trainer/logprobs.py: DEFAULT_CHUNK_BYTES = 16 MiB, about three live).
LOGPROB_CHUNK_BUFFERS = 3 * 16 * 2**20
KV_CACHE_BYTES = 2  # SGLang's default KV cache dtype follows the bf16 model


@dataclass(frozen=True)
class Layout:
    """The parallel layout of the trainer."""
    tensor: int
    pipeline: int
    virtual: Optional[int]
    data: int
    sequence_parallel: bool
    distributed_optimizer: bool


@dataclass(frozen=True)
class Workload:
    """What one optimizer step pushes through each GPU."""
    seq_length: int             # prompt + response tokens of the longest sample
    micro_batch_size: int
    num_micro_batches: int      # per DP rank and optimizer step
    recompute: Optional[str]    # None, "selective" or "full"
    params_bytes: int           # 2 for bf16/fp16, 4 for fp32
    reference_model: bool       # a frozen copy of the weights for the KL term


@dataclass(frozen=True)
class Colocation:
    """SGLang servers sharing the trainer's GPUs."""
    mem_fraction_static: float  # SGLang's --mem-fraction-static: weights + KV cache pool
    engine_tp: int              # tensor-parallel size of each SGLang server


@dataclass(frozen=True)
class StageMemory:
    """Bytes per GPU of one pipeline stage (the first and the last stage are the extremes)."""
    stage: str
    params: int
    in_flight: float            # micro-batches whose activations are held at the peak
    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float
    reference: float
    sglang_weights: float
    sglang_kv_cache: float
    reserve: float

    @property
    def total(self) -> float:
        return sum(getattr(self, f.name) for f in fields(self)
                   if f.name not in ("stage", "params", "in_flight"))


def norm_params(arch: Architecture) -> int:
    """One norm over the hidden size: RMSNorm's weight, or LayerNorm's weight and bias."""
    return arch.hidden_size * (2 if arch.normalization == "LayerNorm" else 1)


def layer_params(arch: Architecture, tp: int) -> int:
    """Parameters of one transformer layer on one TP rank: QKV (+ bias), output projection and
    the MLP (fc1 = [gate; up] with a gated linear unit, as SwiGLU) are split over TP, with the
    column-parallel biases (QKV, fc1); the two norms (and q/k norms) and the row-parallel biases
    (output projection, fc2) are replicated."""
    h, d, ffn = arch.hidden_size, arch.head_dim, arch.ffn_hidden_size
    bias = arch.add_bias_linear
    qkv_width = (arch.num_attention_heads + 2 * arch.num_query_groups) * d
    fc1_width = (2 if arch.gated_linear_unit else 1) * ffn
    sharded = (h * qkv_width + (qkv_width if arch.qkv_bias or bias else 0)   # linear_qkv
               + arch.num_attention_heads * d * h                            # linear_proj
               + (h + bias) * fc1_width + ffn * h)                           # fc1, fc2
    replicated = (2 * norm_params(arch) + (2 * d if arch.qk_layernorm else 0)
                  + (2 * h if bias else 0))                  # linear_proj and fc2 biases
    return sharded // tp + replicated


def stage_params(arch: Architecture, padded_vocab: int, tp: int, pp: int, first: bool,
                 last: bool) -> int:
    """Parameters on one GPU of a stage: its ``L / PP`` layers, the embedding on the first
    stage, the output layer and final norm on the last (a tied output layer is a second copy
    of the embedding when PP > 1, none when one stage holds both)."""
    params = arch.num_layers // pp * layer_params(arch, tp)
    embedding = padded_vocab * arch.hidden_size // tp
    if first:
        params += embedding
    if last:
        params += norm_params(arch)
        if not arch.tie_word_embeddings or not first:
            params += embedding
    return params


def optimizer_state_bytes(params: int, params_bytes: int, dp: int, distributed: bool) -> float:
    """fp32 master weights (unless the parameters are fp32 already) and Adam's m and v; the
    distributed optimizer shards them over the DP ranks."""
    per_param = 2 * FP32 + (FP32 if params_bytes < FP32 else 0)
    return params * per_param / (dp if distributed else 1)


def layer_activation_bytes(arch: Architecture, seq: int, micro_batch: int, tp: int,
                           sequence_parallel: bool, recompute: Optional[str]) -> float:
    """Activation bytes one transformer layer keeps for the backward pass of one micro-batch
    (Korthikanti et al. 2022, 16-bit activations, no dropout masks counted separately):

    - no recomputation: ``sbh (34 + 5as/h) / t`` with sequence parallelism,
      ``sbh (10 + 24/t + 5as/(ht))`` without (Table 2);
    - selective (attention core recomputed): the ``5as/h`` term drops;
    - full: only the layer input, ``2sbh`` (``/t`` with sequence parallelism).
    """
    s, b, h, a, t = seq, micro_batch, arch.hidden_size, arch.num_attention_heads, tp
    sbh = s * b * h
    attention_scores = 0.0 if recompute == "selective" else 5 * a * s / h
    if recompute == "full":
        return 2 * sbh / (t if sequence_parallel else 1)
    if sequence_parallel:
        return sbh * (34 + attention_scores) / t
    return sbh * (10 + 24 / t + attention_scores / t)


def in_flight_micro_batches(rank: int, pp: int, vpp: Optional[int], num_micro_batches: int) -> float:
    """Micro-batches (in units of a whole stage's layers) whose activations pipeline rank
    ``rank`` holds at its peak, from the warm-up counts of Megatron-Core's schedules:

    - 1F1B: ``min(m, PP - rank)``; on the first stage PP micro-batches;
    - interleaved with ``v`` chunks: ``min(m v, 2 (PP - rank - 1) + (v - 1) PP + 1)`` chunks of
      ``L / (PP v)`` layers each; on the first stage this is Korthikanti's
      ``PP (1 + (PP - 1) / (PP v))``.
    """
    if not vpp:
        return min(num_micro_batches, pp - rank)
    chunks = min(num_micro_batches * vpp, 2 * (pp - rank - 1) + (vpp - 1) * pp + 1)
    return chunks / vpp


def logits_bytes(seq: int, micro_batch: int, padded_vocab: int, tp: int, params_bytes: int) -> float:
    """The last stage's logits ``[s, b, V/t]`` kept for the backward pass plus their gradient
    (both in the parameter dtype), and the chunked fp32 log-prob buffers."""
    return 2 * seq * micro_batch * padded_vocab / tp * params_bytes + LOGPROB_CHUNK_BUFFERS


def sglang_memory(arch: Architecture, gpu_bytes: float, colocation: Colocation) -> tuple[float, float]:
    """(weights, KV cache pool) of a colocated SGLang server on one GPU: SGLang takes
    ``mem_fraction_static`` of the GPU for both; the weights are the bf16 model over its TP."""
    weights = stage_params(arch, arch.vocab_size, colocation.engine_tp, 1, True, True) * 2
    return weights, colocation.mem_fraction_static * gpu_bytes - weights


def kv_cache_tokens(arch: Architecture, kv_bytes: float, engine_tp: int) -> int:
    """Tokens a KV cache pool of ``kv_bytes`` holds on one GPU: K and V of every layer for the
    GPU's KV heads (replicated when the server's TP exceeds the KV heads)."""
    heads = max(1, arch.num_query_groups // engine_tp)
    per_token = 2 * arch.num_layers * heads * arch.head_dim * KV_CACHE_BYTES
    return max(0, int(kv_bytes // per_token))


def stage_memory(arch: Architecture, padded_vocab: int, layout: Layout, work: Workload,
                 rank: int, gpu_bytes: float, reserve_bytes: float,
                 colocation: Optional[Colocation] = None) -> StageMemory:
    """The memory of one GPU of pipeline rank ``rank``."""
    t, pp = layout.tensor, layout.pipeline
    first, last = rank == 0, rank == pp - 1
    params = stage_params(arch, padded_vocab, t, pp, first, last)
    in_flight = in_flight_micro_batches(rank, pp, layout.virtual, work.num_micro_batches)
    per_layer = layer_activation_bytes(arch, work.seq_length, work.micro_batch_size, t,
                                       layout.sequence_parallel, work.recompute)
    activations = in_flight * (arch.num_layers // pp) * per_layer
    if work.recompute == "full":  # the layer being recomputed holds its full activations
        activations += layer_activation_bytes(arch, work.seq_length, work.micro_batch_size, t,
                                              layout.sequence_parallel, None)
    sglang = sglang_memory(arch, gpu_bytes, colocation) if colocation else (0.0, 0.0)
    return StageMemory(
        stage="single stage" if first and last else ("first stage" if first else "last stage"),
        params=params,
        in_flight=in_flight,
        weights=params * work.params_bytes,
        gradients=params * FP32,  # Megatron accumulates and reduces bf16 gradients in fp32
        optimizer=optimizer_state_bytes(params, work.params_bytes, layout.data,
                                        layout.distributed_optimizer),
        activations=activations,
        logits=logits_bytes(work.seq_length, work.micro_batch_size, padded_vocab, t,
                            work.params_bytes) if last else 0.0,
        reference=params * work.params_bytes if work.reference_model else 0.0,
        sglang_weights=sglang[0],
        sglang_kv_cache=sglang[1],
        reserve=reserve_bytes,
    )


def plan_stages(arch: Architecture, padded_vocab: int, layout: Layout, work: Workload,
                gpu_bytes: float, reserve_bytes: float,
                colocation: Optional[Colocation] = None) -> list[StageMemory]:
    """The first and the last pipeline stage (one entry without PP): the first holds the most
    activations, the last the logits; the stages between hold less than either."""
    ranks = sorted({0, layout.pipeline - 1})
    return [stage_memory(arch, padded_vocab, layout, work, r, gpu_bytes, reserve_bytes,
                         colocation) for r in ranks]
