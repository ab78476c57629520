"""The trainer's GPU layer stack as this machine can build it, for the memory measurement.

On GPUs the trainer uses Transformer Engine's layer spec: RMSNorm fused into the QKV and FC1
linear layers, Megatron's fused SwiGLU (``bias_activation_fusion``) and fused (flash)
attention. None of that runs here, and Megatron's local spec keeps more for the backward pass:
torch's RMSNorm, decomposed on the CPU and meta devices, keeps two fp32 copies of its input
(16 bytes per token and hidden unit per layer more than TE), the unfused SwiGLU its SiLU
output and ``up + glu_linear_offset``, the unfused attention its fp32 softmax. The measured
model is therefore Megatron's local spec (its ``ColumnParallelLinear`` / ``RowParallelLinear``
with sequence parallelism, attention, MLP, rotary embeddings, pipeline and DDP code) with the
memory of the GPU kernels put back (only the norms for a config that asks for the local spec,
``model.transformer_impl: local``):

- :class:`FusedRMSNorm` keeps its input and the fp32 ``1/rms`` of each token, as TE's RMSNorm
  and torch's fused CUDA kernel do, and marks its weight ``sequence_parallel`` as ``TENorm``
  does (so Megatron all-reduces its gradient over TP under sequence parallelism; Megatron's
  torch norm refuses sequence parallelism for lack of this mark);
- :class:`FlashDotProductAttention` runs torch's flash-attention kernel and keeps ``q``, ``k``,
  ``v``, the output and the fp32 log-sum-exp per head and token, K and V with their own
  (grouped-query) heads, as TE's fused attention does;
- SwiGLU is Megatron's own fused ``SwiGLUFunction`` (the builder turns
  ``bias_activation_fusion`` on for TE), run eagerly (torch.compile's ``force_eager`` stance).

The two stand-ins' arithmetic between their outputs, which a fused kernel keeps in registers,
runs as :func:`~.tracker.kernel_scratch` (not counted). They compute the real thing (the tests
compare them with torch's references); the sliding window of Mistral/Qwen layers is not
applied (a flash kernel keeps the same tensors with or without it).
"""

from __future__ import annotations

import dataclasses

import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from ..config.model import ModelConfig
from ..config.parallel import ParallelConfig
from ..models.architecture import Architecture
from ..models.builder import layer_spec, model_chunks, transformer_config
from ..runtime import cpu_compat
from .tracker import kernel_scratch


class _RMSNormFunction(torch.autograd.Function):
    """``x / rms(x) * weight``, keeping ``x`` and ``1/rms`` [..., 1] (fp32, or the input's
    dtype when wider) for the backward; its arithmetic is the kernel's scratch."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        wide = torch.promote_types(x.dtype, torch.float32)
        out = torch.empty_like(x)
        rstd = x.new_empty((*x.shape[:-1], 1), dtype=wide)
        with kernel_scratch():
            xw = x.to(wide)
            rstd.copy_(torch.rsqrt(xw.pow(2).mean(-1, keepdim=True) + eps))
            out.copy_(xw * rstd * weight.to(wide))
        ctx.save_for_backward(x, weight, rstd)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        grad_x, grad_weight = torch.empty_like(x), torch.empty_like(weight)
        with kernel_scratch():
            x_hat = x.to(rstd.dtype) * rstd
            g = grad.to(rstd.dtype)
            gw = g * weight.to(rstd.dtype)
            grad_weight.copy_((g * x_hat).reshape(-1, x.shape[-1]).sum(0))
            grad_x.copy_(rstd * (gw - x_hat * (gw * x_hat).mean(-1, keepdim=True)))
        return grad_x, grad_weight, None


class FusedRMSNorm(torch.nn.Module):
    """RMSNorm with the memory of a fused kernel (module docstring); built by Megatron's
    ``build_module`` like its own norms."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype,
                                                    device=cpu_compat.device()))
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNormFunction.apply(x, self.weight, self.eps)


class _FlashAttention(torch.autograd.Function):
    """Causal flash attention of ``q`` [b, heads, s, d] over ``k``, ``v`` [b, groups, s, d];
    keeps q, k, v, the output and the log-sum-exp [b, heads, s] (fp32). K and V expanded to
    the query heads (torch's kernel wants them so; TE's reads the groups) are scratch."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        repeat = q.size(1) // k.size(1)
        with kernel_scratch():
            k_heads, v_heads = k.repeat_interleave(repeat, 1), v.repeat_interleave(repeat, 1)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k_heads, v_heads, 0.0, True, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        repeat, groups = q.size(1) // k.size(1), k.size(1)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        with kernel_scratch():
            dq_, dk_, dv_ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                grad.contiguous(), q, k.repeat_interleave(repeat, 1),
                v.repeat_interleave(repeat, 1), out, lse, 0.0, True, scale=ctx.scale)
            dq.copy_(dq_)
            dk.copy_(dk_.unflatten(1, (groups, repeat)).sum(2))
            dv.copy_(dv_.unflatten(1, (groups, repeat)).sum(2))
        return dq, dk, dv, None


class FlashDotProductAttention(DotProductAttention):
    """Megatron's core attention (same constructor: heads per TP rank, softmax scale) with a
    flash kernel's memory (module docstring). Causal masks only."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        """``query`` [s, b, heads, d], ``key``/``value`` [s, b, groups, d] -> [s, b, heads d].
        The mask type is the module's own: under selective recomputation Megatron passes it
        as a tensor value, which a meta tensor does not have."""
        if self.attn_mask_type != AttnMaskType.causal or attention_bias is not None \
                or packed_seq_params is not None:
            raise NotImplementedError("the measured attention is causal, without bias or "
                                      "packed sequences, as the trainer's")
        s, b = query.shape[:2]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))      # [b, h, s, d]
        out = _FlashAttention.apply(q, k, v, self.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)


def gpu_impl(model_cfg: ModelConfig) -> str:
    """The layer spec the trainer takes on a GPU: Transformer Engine unless the config asks
    for the local one (``auto`` is TE where a GPU is)."""
    return "local" if model_cfg.transformer_impl == "local" else "transformer_engine"


def measured_layer_spec(arch: Architecture, model_cfg: ModelConfig):
    """Megatron's local layer spec with :class:`FusedRMSNorm` in place of its norms and, for
    the TE spec, :class:`FlashDotProductAttention` in place of its core attention."""
    spec = layer_spec(arch, "local", model_cfg)
    attention = spec.submodules.self_attention
    fused = gpu_impl(model_cfg) == "transformer_engine"
    attention_modules = dataclasses.replace(
        attention.submodules,
        core_attention=FlashDotProductAttention if fused else attention.submodules.core_attention,
        **({"q_layernorm": FusedRMSNorm, "k_layernorm": FusedRMSNorm}
           if arch.qk_layernorm else {}))
    layer = dataclasses.replace(spec.submodules, input_layernorm=FusedRMSNorm,
                                pre_mlp_layernorm=FusedRMSNorm,
                                self_attention=dataclasses.replace(
                                    attention, submodules=attention_modules))
    return dataclasses.replace(spec, submodules=layer)


def measured_transformer_config(arch: Architecture, model_cfg: ModelConfig,
                                parallel: ParallelConfig):
    """The builder's ``TransformerConfig`` for the GPU's spec (:func:`gpu_impl`; TE's fuses
    SwiGLU), in bf16 (FP8 needs TE), with the weights made on the current device, as on a
    GPU; fixed sequence lengths and unbatched p2p: every micro-batch is the full length (the
    plan's case), and the shape exchange of variable lengths would read values from tensors
    that have none."""
    model_cfg = dataclasses.replace(model_cfg, fp8=None)
    return dataclasses.replace(transformer_config(arch, model_cfg, parallel, gpu_impl(model_cfg)),
                               use_cpu_initialization=False, variable_seq_lengths=False,
                               batch_p2p_comm=False)


def build_measured_model(arch: Architecture, model_cfg: ModelConfig, parallel: ParallelConfig,
                         max_sequence_length: int) -> list:
    """This rank's chunks of the measured model (on the current device: meta under
    :func:`~repo_megatron.runtime.cpu_compat.cuda_redirected_to`)."""
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    config = measured_transformer_config(arch, model_cfg, parallel)
    layers = arch.num_layers // (parallel.pipeline_model_parallel_size
                                 * (parallel.virtual_pipeline_model_parallel_size or 1))
    block = TransformerBlockSubmodules(layer_specs=[measured_layer_spec(arch, model_cfg)] * layers,
                                       layer_norm=FusedRMSNorm)
    return model_chunks(arch, model_cfg, parallel, config, block, max_sequence_length)
