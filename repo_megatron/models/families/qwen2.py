"""Qwen2 / Qwen2.5: bias on the QKV projection, tied embeddings in the small sizes."""

from ..architecture import Architecture, llama_like, register_family


@register_family("qwen2", ["Qwen2ForCausalLM", "qwen2"])
def parse(hf: dict) -> Architecture:
    return llama_like(hf, "qwen2", qkv_bias=True)
