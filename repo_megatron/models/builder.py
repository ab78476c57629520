"""Build Megatron-Core ``GPTModel`` chunks for a Hugging Face architecture.

``build_model(arch, model_cfg, parallel_cfg)`` returns one ``GPTModel`` per virtual pipeline
stage held by this rank (a list of length 1 without virtual PP), in the current parallel
layout. The layer spec is chosen explicitly (:func:`select_transformer_impl`) and logged.
"""

from __future__ import annotations

import logging
import math
from typing import Optional

import torch

from ..config.model import ModelConfig
from ..errors import ConfigError
from ..config.parallel import ParallelConfig
from ..runtime import cpu_compat
from .architecture import Architecture, RopeScaling, padded_vocab_size
from .fp8 import check_fp8, fp8_token_multiple

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Architecture.activation -> the MLP's activation_func (the ones Transformer Engine runs too)
ACTIVATIONS = {"silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu,
               "relu": torch.nn.functional.relu}


def te_available() -> bool:
    """Whether Transformer Engine imports in this environment (does not check for a GPU)."""
    try:
        from megatron.core.extensions.transformer_engine import HAVE_TE
    except Exception:  # a half-installed TE raises more than ImportError
        return False
    return bool(HAVE_TE)


def select_transformer_impl(model_cfg: ModelConfig) -> str:
    """``transformer_engine`` or ``local``: what ``model.transformer_impl`` resolves to here.

    ``auto`` takes Transformer Engine when it imports and a GPU is present. Asking for TE (or
    FP8) where it cannot run is an error, never a silent fallback."""
    te_ok, gpu = te_available(), cpu_compat.has_gpu()
    impl = model_cfg.transformer_impl
    if impl == "auto":
        impl = "transformer_engine" if (te_ok and gpu) else "local"
    if impl == "transformer_engine" and not (te_ok and gpu):
        missing = "Transformer Engine does not import" if not te_ok else "no GPU is present"
        raise ConfigError(f"model.transformer_impl=transformer_engine but {missing}; "
                          "use model.transformer_impl=local on CPU")
    if model_cfg.fp8 is not None and impl != "transformer_engine":
        raise ConfigError(f"model.fp8={model_cfg.fp8} needs Transformer Engine on a GPU "
                          "(model.transformer_impl resolved to local here)")
    return impl


def bias_activation_fusion(arch: Architecture, impl: str) -> bool:
    """Whether Megatron may fuse the fc1 bias with the activation: only with Transformer
    Engine, and only for the kernels its MLP has (SwiGLU, GeGLU, GELU with a bias)."""
    fusable = (arch.activation == "silu" and arch.gated_linear_unit) or (
        arch.activation == "gelu" and (arch.gated_linear_unit or arch.add_bias_linear))
    return impl == "transformer_engine" and fusable


def transformer_config(arch: Architecture, model_cfg: ModelConfig, parallel: ParallelConfig,
                       impl: str):
    """The ``TransformerConfig`` for ``arch`` in this layout (RL fine-tuning: no dropout)."""
    from megatron.core.transformer import TransformerConfig

    dtype = DTYPES[model_cfg.params_dtype]
    check_fp8(model_cfg, parallel, arch.num_layers)
    fp8 = {}
    if model_cfg.fp8 is not None:
        bf16_ends = model_cfg.num_layers_at_start_in_bf16 + model_cfg.num_layers_at_end_in_bf16
        fp8 = dict(fp8=model_cfg.fp8, fp8_recipe=model_cfg.fp8_recipe,
                   fp8_param=model_cfg.fp8_param_gather,
                   first_last_layers_bf16=bf16_ends > 0,
                   num_layers_at_start_in_bf16=model_cfg.num_layers_at_start_in_bf16,
                   num_layers_at_end_in_bf16=model_cfg.num_layers_at_end_in_bf16)
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        normalization=arch.normalization,
        layernorm_epsilon=arch.layernorm_epsilon,
        gated_linear_unit=arch.gated_linear_unit,
        activation_func=ACTIVATIONS[arch.activation],
        add_bias_linear=arch.add_bias_linear,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_layernorm,
        # Sliding-window attention as transformers applies it: a query sees keys i - (W-1)..i.
        window_size=(arch.sliding_window - 1, 0) if arch.sliding_window else None,
        window_attn_skip_freq=None if arch.sliding_window_layers is None
        else [int(s) for s in arch.sliding_window_layers],
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # Always set both: without them tied embeddings are silently not synchronised under PP.
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        # The forward step reads it: packed rows go to TE as THD, to the local spec as a mask.
        transformer_impl=impl,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype is torch.bfloat16,
        fp16=dtype is torch.float16,
        attention_softmax_in_fp32=True,
        # Responses in a micro-batch have different lengths from one micro-batch to the next.
        variable_seq_lengths=True,
        # Dense models: the (unused) default MoE dispatcher rejects variable_seq_lengths.
        moe_token_dispatcher_type="alltoall",
        # With gloo, batched p2p gives wrong results under the interleaved schedule.
        batch_p2p_comm=cpu_compat.has_gpu(),
        use_cpu_initialization=not cpu_compat.has_gpu(),
        bias_activation_fusion=bias_activation_fusion(arch, impl),
        masked_softmax_fusion=impl == "transformer_engine",
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        recompute_granularity=model_cfg.recompute_granularity,
        recompute_method="uniform" if model_cfg.recompute_granularity == "full" else None,
        recompute_num_layers=1 if model_cfg.recompute_granularity == "full" else None,
        **fp8,
    )


def sequence_length_multiple(model_cfg: ModelConfig, parallel: ParallelConfig) -> int:
    """The multiple every micro-batch's sequence length is padded to in this layout and
    precision: TP under sequence parallelism (Megatron splits the sequence dimension over the
    TP ranks and asserts ``seq % TP == 0`` in ``tensor_parallel/mappings.py``), the FP8 GEMM
    alignment (:func:`~.fp8.fp8_token_multiple`: 16, 32 for mxfp8, per TP share under sequence
    parallelism), and their least common multiple when both apply; 1 otherwise."""
    tp = parallel.tensor_model_parallel_size
    multiple = tp if parallel.sequence_parallel else 1
    if model_cfg.fp8 is not None:
        multiple = math.lcm(multiple, fp8_token_multiple(model_cfg.fp8_recipe, tp,
                                                         parallel.sequence_parallel))
    return multiple


def layer_spec(arch: Architecture, impl: str, model_cfg: ModelConfig):
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec, get_gpt_layer_with_transformer_engine_spec)

    if impl == "transformer_engine":
        return get_gpt_layer_with_transformer_engine_spec(
            qk_layernorm=arch.qk_layernorm, fp8=model_cfg.fp8)
    return get_gpt_layer_local_spec(qk_layernorm=arch.qk_layernorm,
                                    normalization=arch.normalization)


def llama3_inv_freq(head_dim: int, theta: float, scaling: RopeScaling) -> torch.Tensor:
    """Inverse RoPE frequencies with Llama-3 scaling, exactly as Hugging Face computes them
    (megatron-core hard-codes low/high factors 1/4 and a context of 8192)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    old_ctx = scaling.original_max_position_embeddings
    low_wavelen = old_ctx / scaling.low_freq_factor
    high_wavelen = old_ctx / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_ctx / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def build_model(arch: Architecture, model_cfg: ModelConfig, parallel: ParallelConfig,
                max_sequence_length: Optional[int] = None) -> list:
    """GPTModel chunks of this rank (one per virtual pipeline stage), on this rank's device."""
    from megatron.core import parallel_state

    impl = select_transformer_impl(model_cfg)
    config = transformer_config(arch, model_cfg, parallel, impl)
    spec = layer_spec(arch, impl, model_cfg)
    if parallel_state.get_tensor_model_parallel_rank() == 0 and \
            parallel_state.get_pipeline_model_parallel_rank() == 0 and \
            parallel_state.get_data_parallel_rank() == 0:
        vocab = padded_vocab_size(arch.vocab_size, model_cfg.make_vocab_size_divisible_by,
                                  parallel.tensor_model_parallel_size)
        log.info("Building %s (%d layers, hidden %d, %d heads / %d KV heads, vocab %d padded to "
                 "%d) with the %s layer spec%s", arch.hf_architecture, arch.num_layers,
                 arch.hidden_size, arch.num_attention_heads, arch.num_query_groups,
                 arch.vocab_size, vocab, impl,
                 f", fp8={model_cfg.fp8} ({model_cfg.fp8_recipe})" if model_cfg.fp8 else "")
    return model_chunks(arch, model_cfg, parallel, config, spec, max_sequence_length)


def model_chunks(arch: Architecture, model_cfg: ModelConfig, parallel: ParallelConfig, config,
                 spec, max_sequence_length: Optional[int] = None) -> list:
    """This rank's GPTModel chunks for a given ``TransformerConfig`` and layer spec (what
    :func:`build_model` selects; the memory measurement passes its own)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    vocab = padded_vocab_size(arch.vocab_size, model_cfg.make_vocab_size_divisible_by,
                              parallel.tensor_model_parallel_size)
    vpp = parallel.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        model = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=vocab,
            max_sequence_length=max_sequence_length or model_cfg.max_sequence_length
            or arch.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False,
                                                                vp_stage=stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False,
                                                                vp_stage=stage),
            share_embeddings_and_output_weights=arch.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_base=int(arch.rope_theta) if float(arch.rope_theta).is_integer()
            else arch.rope_theta,
            vp_stage=stage,
        )
        if arch.rope_scaling is not None and hasattr(model, "rotary_pos_emb"):
            model.rotary_pos_emb.inv_freq = llama3_inv_freq(
                arch.head_dim, arch.rope_theta, arch.rope_scaling)
        # Everything in params_dtype, norms too (the local spec builds them in fp32): what
        # Megatron's Float16Module makes of the model for training, so that forward-only
        # chunks (the reference policy) compute exactly as the trained ones.
        chunks.append(model.to(device=cpu_compat.device(), dtype=DTYPES[model_cfg.params_dtype]))
    return chunks
