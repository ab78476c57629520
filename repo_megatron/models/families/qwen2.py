"""Qwen2 / Qwen2.5: bias on the QKV projection, tied embeddings in the small sizes."""

from ..architecture import Architecture, llama_like, register_family, sliding_window
from ..weight_mapping import (ParamMapping, embedding_and_head, llama_attention, llama_mlp,
                              register_weight_mapping)


@register_family("qwen2", ["Qwen2ForCausalLM", "qwen2"])
def parse(hf: dict) -> Architecture:
    return llama_like(hf, "qwen2", qkv_bias=True, **sliding_window(hf, per_layer=True))


@register_weight_mapping("qwen2")
def weights(arch: Architecture) -> list[ParamMapping]:
    return [*embedding_and_head(arch), *llama_attention(qkv_bias=True), *llama_mlp()]
