"""Qwen3 (dense): RMSNorm on queries and keys per head, no QKV bias."""

from ..architecture import Architecture, llama_like, register_family, sliding_window
from ..weight_mapping import (ParamMapping, embedding_and_head, llama_attention, llama_mlp,
                              qk_layernorm, register_weight_mapping)


@register_family("qwen3", ["Qwen3ForCausalLM", "qwen3"])
def parse(hf: dict) -> Architecture:
    return llama_like(hf, "qwen3", qk_layernorm=True, qkv_bias=bool(hf.get("attention_bias")),
                      **sliding_window(hf, per_layer=True))


@register_weight_mapping("qwen3")
def weights(arch: Architecture) -> list[ParamMapping]:
    return [*embedding_and_head(arch), *llama_attention(qkv_bias=arch.qkv_bias),
            *qk_layernorm(), *llama_mlp()]
