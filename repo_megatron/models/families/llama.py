"""Llama 2 / 3 (incl. llama3 RoPE scaling)."""

from ...errors import ConfigError
from ..architecture import Architecture, llama_like, register_family
from ..weight_mapping import (ParamMapping, embedding_and_head, llama_attention, llama_mlp,
                              register_weight_mapping)


@register_family("llama", ["LlamaForCausalLM", "llama"])
def parse(hf: dict) -> Architecture:
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ConfigError("attention_bias / mlp_bias Llama variants are not supported")
    return llama_like(hf, "llama")


@register_weight_mapping("llama")
def weights(arch: Architecture) -> list[ParamMapping]:
    return [*embedding_and_head(arch), *llama_attention(qkv_bias=False), *llama_mlp()]
