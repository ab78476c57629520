"""Mistral: the Llama layout, sliding-window attention in every layer."""

from ..architecture import Architecture, llama_like, register_family, sliding_window
from ..weight_mapping import (ParamMapping, embedding_and_head, llama_attention, llama_mlp,
                              register_weight_mapping)


@register_family("mistral", ["MistralForCausalLM", "mistral"])
def parse(hf: dict) -> Architecture:
    return llama_like(hf, "mistral", **sliding_window(hf, per_layer=False))


@register_weight_mapping("mistral")
def weights(arch: Architecture) -> list[ParamMapping]:
    return [*embedding_and_head(arch), *llama_attention(qkv_bias=False), *llama_mlp()]
