"""Per-GPU memory of a training layout, in bytes: pure arithmetic, no torch, no Megatron.

Every formula is documented (with its assumptions) in ``docs/scale_out.md``; the sources:

- weights, gradients and optimizer states: Megatron-LM ``docs/distrib_optimizer.md`` (bf16
  parameters with fp32 gradient accumulation: 2 + 4 bytes per parameter, plus 12 bytes of
  fp32 master copy and Adam m, v, divided over DP by the distributed optimizer);
- activations: the tensors a Llama/Qwen layer of Megatron-Core keeps for the backward pass,
  counted like Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
  Models" (arXiv 2205.05198), for grouped-query attention, SwiGLU, RoPE and RMSNorm, with
  Transformer Engine's fused kernels;
- micro-batches in flight: the warm-up counts of Megatron-Core's 1F1B and interleaved
  schedules (``pipeline_parallel/schedules.py``);
- the weight sync: the buckets of ``weight_sync/buckets.py`` filled from
  ``weight_sync/plan.py`` (TP-gathered Hugging Face tensors, one parameter gathered ahead).

Each formula was checked against ``repo-megatron plan --measure`` (:mod:`.measure`), which runs
one training step of the real Megatron code at full size on the meta device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..models.architecture import Architecture

GIB = 2**30
FP32 = 4
# fp32 [chunk, vocab/TP] buffers of the chunked vocab-parallel log-probs
# (repo_megatron/trainer/logprobs.py: DEFAULT_CHUNK_BYTES = 16 MiB); the backward holds four
# at once (the chunk, its shifted copy, the probabilities, the gradient)
LOGPROB_CHUNK_BYTES, LOGPROB_BACKWARD_CHUNKS = 16 * 2**20, 4
# the trainer's causal mask is a [1, 1, s, s] bool tensor (trainer/forward.py)
MASK_BYTES = 1
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
    fused_kernels: bool = True  # Transformer Engine's spec: fused SwiGLU and flash attention
    sync_bucket_bytes: int = 512 * 2**20   # rollout.sglang.weight_bucket_mb
    sync_flattens: bool = False  # weight_sync=tensor: buckets flattened, every stage's received


@dataclass(frozen=True)
class Colocation:
    """SGLang servers sharing the trainer's GPUs, and which side leaves them in which phase
    (repo_megatron/run/colocation.py)."""
    mem_fraction_static: float  # SGLang's --mem-fraction-static: weights + KV cache pool
    engine_tp: int              # tensor-parallel size of each SGLang server
    releases: bool = False      # rollout.sglang.release_memory: SGLang's memory off in training
    trainer_offloaded: bool = False  # rollout.sglang.offload_trainer: the trainer off in rollout


@dataclass(frozen=True)
class StageMemory:
    """Bytes per GPU of one pipeline stage (the first and the last stage are the extremes)."""
    stage: str
    params: int
    in_flight: float            # micro-batches whose activations are held at the peak
    weights: float
    gradients: float
    optimizer: float
    activations: float          # kept in flight, with the forward's temporaries
    forward_temporary: float    # those temporaries: gone before any backward
    logits: float               # the logits and the loss's forward transients
    logits_transient: float     # those transients: gone before the backward
    loss_backward: float        # the loss's backward temporaries, beside the logits
    backward: float             # the largest temporaries of the backward pass
    reference: float
    weight_sync: float          # after the step, when the activations are gone
    sglang_weights: float
    sglang_kv_cache: float
    reserve: float
    sglang_released: bool = False   # SGLang releases its weights and KV cache for training
    trainer_offloaded: bool = False  # the trainer's state leaves the GPU for the rollout

    @property
    def step(self) -> float:
        """The step's largest moment beside the trainer's state: the activations kept in
        flight with a forward layer's temporaries, with the loss's forward (the logits and
        their transients), with the loss's backward (beside the logits), or with another
        backward temporary (the current micro-batch's logits are gone by then)."""
        kept = self.activations - self.forward_temporary
        return kept + max(self.forward_temporary, self.logits,
                          self.logits - self.logits_transient + self.loss_backward, self.backward)

    @property
    def state(self) -> float:
        """What the trainer holds between steps (what an offload takes off the GPU)."""
        return self.weights + self.gradients + self.optimizer + self.reference

    @property
    def trainer(self) -> float:
        """The trainer's peak: its state with the step or the weight sync, whichever is
        larger."""
        return self.state + max(self.step, self.weight_sync)

    @property
    def rollout_phase(self) -> float:
        """While SGLang generates: its weights and KV cache, beside the trainer's state unless
        the trainer is offloaded."""
        trainer = 0.0 if self.trainer_offloaded else self.state
        return trainer + self.sglang_weights + self.sglang_kv_cache + self.reserve

    @property
    def train_phase(self) -> float:
        """The step: the trainer's state and the step's peak, beside SGLang's memory unless it
        is released."""
        sglang = 0.0 if self.sglang_released else self.sglang_weights + self.sglang_kv_cache
        return self.state + self.step + sglang + self.reserve

    @property
    def sync_phase(self) -> float:
        """The weight sync: the trainer's state and the sync's buffers, beside SGLang's
        weights (resumed first) and, unless released, its KV cache (resumed after)."""
        kv_cache = 0.0 if self.sglang_released else self.sglang_kv_cache
        return self.state + self.weight_sync + self.sglang_weights + kv_cache + self.reserve

    @property
    def total(self) -> float:
        """The peak over the phases (without colocation: the trainer's peak and the reserve)."""
        return max(self.rollout_phase, self.train_phase, self.sync_phase)


def max_mem_fraction_static(stage: StageMemory, gpu_bytes: float) -> float:
    """The largest ``--mem-fraction-static`` whose rollout phase still fits ``stage``'s GPU:
    SGLang's share next to what the trainer keeps there during the rollout and the reserve
    (the other phases do not hold the KV cache when SGLang releases it)."""
    kept = 0.0 if stage.trainer_offloaded else stage.state
    return max(0.0, (gpu_bytes - stage.reserve - kept) / gpu_bytes)


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
                           sequence_parallel: bool, recompute: Optional[str],
                           params_bytes: int = 2, fused_kernels: bool = True) -> float:
    """Activation bytes one transformer layer keeps for the backward pass of one micro-batch,
    activations in the parameter dtype (``params_bytes`` per value):

    - the inputs of the two RMSNorms and of the QKV and FC1 layers, ``4 s b h`` values,
      split over TP by sequence parallelism only;
    - split over TP: the QKV output ``s b (a + 2g) d`` (kept whole by V, a view of it), Q and
      K after RoPE ``s b (a + g) d``, the attention output ``s b a d``, the FC1 output
      ``2 s b f`` and the SwiGLU output ``s b f``; unfused (the local spec), also SwiGLU's
      SiLU output and its ``up + glu_linear_offset``, ``2 s b f``;
    - RoPE's cos and sin of Q and K, ``4 s d`` values (not split, not per sample);
    - no recomputation: Transformer Engine's flash attention adds its fp32 log-sum-exp
      ``4 b a s / t`` bytes; the local spec's unfused attention its fp32 softmax and the
      probabilities cast to the parameter dtype, ``(4 + 2) b a s^2 / t`` in bf16 and
      ``4 b a s^2 / t`` in fp32 (Korthikanti's ``5 a s / h`` term, without dropout);
      selective recomputation keeps neither;
    - full recomputation: only the layer's input, ``s b h`` values (``/ t`` with sequence
      parallelism).
    """
    s, b, h, t = seq, micro_batch, arch.hidden_size, tp
    a, g, d, f = (arch.num_attention_heads, arch.num_query_groups, arch.head_dim,
                  arch.ffn_hidden_size)
    sp = t if sequence_parallel else 1
    if recompute == "full":
        return s * b * h * params_bytes / sp
    replicated = 4 * h
    sharded = (a + 2 * g) * d + (a + g) * d + a * d + 3 * f + (0 if fused_kernels else 2 * f)
    per_layer = s * b * params_bytes * (replicated / sp + sharded / t) + 4 * s * d * params_bytes
    if recompute is None:
        per_layer += (FP32 * b * a * s / t if fused_kernels
                      else attention_scores_bytes(arch, seq, micro_batch, tp,
                                                  FP32 + _narrower(params_bytes)))
    return per_layer


def _narrower(params_bytes: int) -> int:
    """The bytes of a cast of fp32 softmax values back to the parameter dtype (none in fp32)."""
    return params_bytes if params_bytes < FP32 else 0


def attention_scores_bytes(arch: Architecture, seq: int, micro_batch: int, tp: int,
                           bytes_per_score: float) -> float:
    """``bytes_per_score`` bytes per attention score ``[b, a / t, s, s]`` of one layer (the
    local spec's unfused attention)."""
    return bytes_per_score * micro_batch * arch.num_attention_heads / tp * seq * seq


def stack_activation_bytes(arch: Architecture, seq: int, micro_batch: int, tp: int,
                           sequence_parallel: bool, recompute: Optional[str],
                           params_bytes: int = 2) -> float:
    """What a model chunk keeps per micro-batch besides its layers' activations: the hidden
    states at its boundary ``[s, b, h]`` (its input, or the output sent to the next stage;
    ``/ t`` with sequence parallelism) and, with recomputation, what Megatron's checkpoints
    keep as inputs: the trainer's causal mask ``[s, s]`` (bool) and the rotary table
    ``[s, d]`` (fp32)."""
    s, b, h, t = seq, micro_batch, arch.hidden_size, tp
    boundary = s * b * h * params_bytes / (t if sequence_parallel else 1)
    if recompute is None:
        return boundary
    return boundary + MASK_BYTES * s * s + FP32 * s * arch.head_dim


def forward_temporary_bytes(arch: Architecture, seq: int, micro_batch: int, tp: int,
                            sequence_parallel: bool, recompute: Optional[str],
                            params_bytes: int = 2, fused_kernels: bool = True) -> float:
    """The forward's temporaries in the layer being computed: a row-parallel layer's output
    ``[s, b, h]`` before its reduce-scatter (its all-reduce, in place, without sequence
    parallelism) and the sequence-gathered input ``[s, b, h]`` of a column-parallel layer;
    under full recomputation also the FC1 and SwiGLU outputs ``3 s b f / t``, which the
    layer does not keep; unfused attention adds its scores, Megatron's persistent score
    buffer, the fp32 copy of bf16 scores and, when recomputed (not kept), the fp32 softmax and
    the probabilities (``2 + 2 + 4 + 4 + 2`` bytes per score in bf16, ``4 + 4 + 4`` in fp32)."""
    hidden = seq * micro_batch * arch.hidden_size * params_bytes * (2 if sequence_parallel else 1)
    if recompute == "full":
        hidden += 3 * seq * micro_batch * arch.ffn_hidden_size / tp * params_bytes
    if fused_kernels:
        return hidden
    # scores and buffer, the fp32 copy of bf16 scores, the softmax and probabilities unless kept
    per_score = 2 * params_bytes + (FP32 if params_bytes < FP32 else 0) + (
        0 if recompute is None else FP32 + _narrower(params_bytes))
    return hidden + attention_scores_bytes(arch, seq, micro_batch, tp, per_score)


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


def logprob_chunk_bytes(seq: int, micro_batch: int, padded_vocab: int, tp: int,
                        chunks: float) -> float:
    """``chunks`` fp32 ``[chunk, V/t]`` buffers of the chunked log-probs, each 16 MiB or the
    whole micro-batch's logits when they are smaller."""
    return chunks * min(LOGPROB_CHUNK_BYTES, seq * micro_batch * padded_vocab / tp * FP32)


def logprob_forward_bytes(seq: int, micro_batch: int, padded_vocab: int, tp: int,
                          params_bytes: int) -> float:
    """The log-probs' forward buffers: a chunk of the logits in the parameter dtype, its fp32
    copy and the copy megatron's cross-entropy stages work on."""
    return logprob_chunk_bytes(seq, micro_batch, padded_vocab, tp, 2 + params_bytes / FP32)


def logits_transient_bytes(seq: int, micro_batch: int, padded_vocab: int, tp: int,
                           params_bytes: int) -> float:
    """What the loss's forward holds beside the logits for a while: the log-probs' forward
    buffers, or, when ``b > 1``, the output layer's ``[s, b, V/t]`` while GPTModel copies it
    to ``[b, s, V/t]`` (for ``b = 1`` the transpose is a view)."""
    transpose = seq * micro_batch * padded_vocab / tp * params_bytes if micro_batch > 1 else 0
    return max(transpose, logprob_forward_bytes(seq, micro_batch, padded_vocab, tp, params_bytes))


def logits_bytes(seq: int, micro_batch: int, padded_vocab: int, tp: int, params_bytes: int) -> float:
    """The last stage's logits ``[s, b, V/t]`` kept for the backward pass (in the parameter
    dtype) with the loss's forward transients (:func:`logits_transient_bytes`)."""
    return (seq * micro_batch * padded_vocab / tp * params_bytes
            + logits_transient_bytes(seq, micro_batch, padded_vocab, tp, params_bytes))


def backward_bytes(arch: Architecture, padded_vocab: int, seq: int, micro_batch: int, tp: int,
                   sequence_parallel: bool, params_bytes: int, first: bool, last: bool,
                   fused_kernels: bool = True, recompute: Optional[str] = "selective") -> float:
    """The largest temporaries of the backward pass, on top of the activations in flight (in
    the parameter dtype unless said; ``sp`` is ``t`` with sequence parallelism, else 1). A
    weight's gradient is made whole before Megatron adds it to the fp32 buffer
    (``gradient_accumulation_fusion`` is off). The largest of:

    - in a layer, FC1's weight gradient ``2 f h / t``, the gradient of its output
      ``2 s b f / t`` and of its (sequence-gathered) input ``s b h``;
    - around a norm, the residual stream's gradients and the norm's input gradient
      ``3 s b h / sp`` beside a gathered input gradient ``s b h``;
    - unfused attention (the local spec): the fp32 softmax's gradient and its input's
      gradient, and the recomputed softmax unless it was kept (8 or 12 bytes per score), with
      the residual stream's gradients ``2 s b h / sp``;
    - first stage: the embedding's weight gradient ``V h / t``, the gathered gradient of its
      output ``s b h`` and the residual stream's ``s b h / sp``;
    - last stage: the logits' gradient ``s b V / t`` with, first, the log-probs' backward
      chunks (:func:`loss_backward_bytes`), then the output layer's weight gradient
      ``V h / t``, its gathered input gradient ``s b h`` and the residual stream's
      ``s b h / sp`` (and, when ``b > 1``, the logits' gradient made contiguous for it,
      ``s b V / t`` more).
    """
    h, f, t = arch.hidden_size, arch.ffn_hidden_size, tp
    sbh = seq * micro_batch * h * params_bytes
    residual = sbh / (t if sequence_parallel else 1)
    vocab_weight = padded_vocab * h / t * params_bytes
    moments = [(2 * f * h / t + 2 * seq * micro_batch * f / t) * params_bytes + sbh,
               3 * residual + sbh]
    if not fused_kernels:
        moments.append(2 * residual + attention_scores_bytes(
            arch, seq, micro_batch, tp, (2 if recompute is None else 3) * FP32))
    if first:
        moments.append(vocab_weight + sbh + residual)
    if last:
        logits = seq * micro_batch * padded_vocab / t * params_bytes
        moments += [loss_backward_bytes(seq, micro_batch, padded_vocab, tp, params_bytes),
                    logits + vocab_weight + sbh + residual + (logits if micro_batch > 1 else 0)]
    return max(moments)


def loss_backward_bytes(seq: int, micro_batch: int, padded_vocab: int, tp: int,
                        params_bytes: int) -> float:
    """The loss's backward on the last stage, beside the logits it reads: the logits'
    gradient ``s b V / t`` and the log-probs' backward chunks (fp32)."""
    return (seq * micro_batch * padded_vocab / tp * params_bytes
            + logprob_chunk_bytes(seq, micro_batch, padded_vocab, tp, LOGPROB_BACKWARD_CHUNKS))


def weight_sync_bytes(arch: Architecture, padded_vocab: int, params_bytes: int,
                      bucket_bytes: int, flattens: bool, embedding: bool,
                      output_layer: bool, stage_bytes: float, tp: int) -> float:
    """The weight sync's largest moment on one GPU of a stage, in bytes (it runs after the
    step, beside the trainer's state but not its activations). A layer's Hugging Face
    tensors in the parameter dtype: attention ``A = ((a + 2g) d + a d) h``, FC1 (gate and
    up) ``F1 = 2 f h``, FC2 ``F2 = f h``; the TP-gathered embedding or output layer
    ``E = V h``. A bucket that holds the stage's gathered weights (``stage_bytes``) holds
    them all at the end, with the last FC1 still gathered. At TP 1 nothing is gathered: the
    Hugging Face tensors are views of the parameters but for QKV, split into three copies, so
    a bucket holds the QKV copies of the layers it takes (plus its flattened copy).

    - in a layer: FC1 gathered and its merged copy (``2 F1``, the gate and up tensors are
      views of the copy), FC2 already gathered (one parameter ahead, ``F2``), and the open
      bucket: the layer's attention tensors (``A``), or the whole bucket when it holds
      ``A + F1`` or more;
    - the last stage's output layer travels alone (``E``) while the bucket before it still
      holds FC2 and, when the bucket holds ``F1 / 2 + F2``, FC1 through its up view;
    - the first stage's embedding travels alone, with the next layer's QKV gathered;
    - ``flattens`` (colocated ``weight_sync: tensor``): each bucket is flattened into one more
      copy of its content (``A + F1 / 2`` when the gate joins the attention tensors), and every
      GPU receives every stage's buckets, the largest being the embedding or the output layer
      alone (``2 max(E, bucket)``).
    """
    h, d, f = arch.hidden_size, arch.head_dim, arch.ffn_hidden_size
    a, g = arch.num_attention_heads, arch.num_query_groups
    qkv = (a + 2 * g) * d * (h + (1 if arch.qkv_bias else 0)) * params_bytes
    attention = qkv + a * d * h * params_bytes
    fc1, fc2 = 2 * f * h * params_bytes, f * h * params_bytes
    big = padded_vocab * h * params_bytes
    if tp == 1:
        layers = min(arch.num_layers, bucket_bytes // (attention + fc1 + fc2) + 1)
        held = min(bucket_bytes, stage_bytes)
        return layers * qkv + (max(held, big) if flattens else 0)
    if bucket_bytes >= stage_bytes:  # one bucket: the whole stage, and the last FC1 gathered
        return stage_bytes * (2 if flattens else 1) + fc1
    # the open bucket's storage, and its content when flattened, as FC1 is split into HF names
    if bucket_bytes >= attention + fc1:
        held = flat = bucket_bytes
    else:
        held = min(bucket_bytes, attention)
        flat = attention + fc1 / 2 if bucket_bytes >= attention + fc1 / 2 else held
    moments = [held + 2 * fc1 + fc2 + (flat if flattens else 0)]
    if output_layer:
        tail_flat = fc1 / 2 + fc2 if bucket_bytes >= fc1 / 2 + fc2 else fc2
        tail = fc1 + fc2 if bucket_bytes >= fc1 / 2 + fc2 else fc2
        moments.append(big + tail + (tail_flat if flattens else 0))
    if embedding:
        moments.append(big * (2 if flattens else 1) + qkv)
    if flattens:
        moments.append(2 * max(big, bucket_bytes))
    return max(moments)


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


def stage_name(pipeline_rank: int, pipeline: int) -> str:
    """The name of a pipeline position in the plan's tables."""
    first, last = pipeline_rank == 0, pipeline_rank == pipeline - 1
    return "single stage" if first and last else (
        "first stage" if first else ("last stage" if last else f"stage {pipeline_rank}"))


def stage_memory(arch: Architecture, padded_vocab: int, layout: Layout, work: Workload,
                 rank: int, gpu_bytes: float, reserve_bytes: float,
                 colocation: Optional[Colocation] = None) -> StageMemory:
    """The memory of one GPU of pipeline rank ``rank``."""
    t, pp = layout.tensor, layout.pipeline
    first, last = rank == 0, rank == pp - 1
    params = stage_params(arch, padded_vocab, t, pp, first, last)
    in_flight = in_flight_micro_batches(rank, pp, layout.virtual, work.num_micro_batches)
    args = (arch, work.seq_length, work.micro_batch_size, t, layout.sequence_parallel)
    per_layer = layer_activation_bytes(*args, work.recompute, work.params_bytes,
                                       work.fused_kernels)
    chunks_in_flight = in_flight * (layout.virtual or 1)
    forward_temporary = forward_temporary_bytes(*args, work.recompute, work.params_bytes,
                                                work.fused_kernels)
    activations = (in_flight * (arch.num_layers // pp) * per_layer
                   + chunks_in_flight * stack_activation_bytes(*args, work.recompute,
                                                               work.params_bytes)
                   + forward_temporary)
    backward = backward_bytes(arch, padded_vocab, work.seq_length, work.micro_batch_size, t,
                              layout.sequence_parallel, work.params_bytes, first, last,
                              work.fused_kernels, work.recompute)
    if work.recompute == "full":  # the recomputed layer, freed as its own backward goes on
        backward = max(backward, layer_activation_bytes(*args, None, work.params_bytes,
                                                        work.fused_kernels))
    sglang = sglang_memory(arch, gpu_bytes, colocation) if colocation else (0.0, 0.0)
    # the weight sync skips the last stage's copy of tied embeddings
    synced = params - (padded_vocab * arch.hidden_size // t
                       if last and not first and arch.tie_word_embeddings else 0)
    return StageMemory(
        stage=stage_name(rank, pp),
        params=params,
        in_flight=in_flight,
        weights=params * work.params_bytes,
        gradients=params * FP32,  # Megatron accumulates and reduces bf16 gradients in fp32
        optimizer=optimizer_state_bytes(params, work.params_bytes, layout.data,
                                        layout.distributed_optimizer),
        activations=activations,
        forward_temporary=forward_temporary,
        logits=logits_bytes(work.seq_length, work.micro_batch_size, padded_vocab, t,
                            work.params_bytes) if last else 0.0,
        logits_transient=logits_transient_bytes(work.seq_length, work.micro_batch_size,
                                                padded_vocab, t, work.params_bytes)
        if last else 0.0,
        loss_backward=loss_backward_bytes(work.seq_length, work.micro_batch_size, padded_vocab,
                                          t, work.params_bytes) if last else 0.0,
        backward=backward,
        reference=params * work.params_bytes if work.reference_model else 0.0,
        weight_sync=weight_sync_bytes(arch, padded_vocab, work.params_bytes,
                                      work.sync_bucket_bytes, work.sync_flattens,
                                      embedding=first,
                                      output_layer=last and not arch.tie_word_embeddings,
                                      stage_bytes=synced * t * work.params_bytes, tp=t),
        sglang_weights=sglang[0],
        sglang_kv_cache=sglang[1],
        reserve=reserve_bytes,
        sglang_released=bool(colocation and colocation.releases),
        trainer_offloaded=bool(colocation and colocation.trainer_offloaded),
    )


def plan_stages(arch: Architecture, padded_vocab: int, layout: Layout, work: Workload,
                gpu_bytes: float, reserve_bytes: float,
                colocation: Optional[Colocation] = None) -> list[StageMemory]:
    """The first and the last pipeline stage (one entry without PP): the first holds the most
    activations, the last the logits; the stages between hold less than either."""
    ranks = sorted({0, layout.pipeline - 1})
    return [stage_memory(arch, padded_vocab, layout, work, r, gpu_bytes, reserve_bytes,
                         colocation) for r in ranks]
