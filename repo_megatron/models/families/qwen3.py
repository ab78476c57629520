"""Qwen3 (dense): RMSNorm on queries and keys per head, no QKV bias."""

from ..architecture import Architecture, llama_like, register_family


@register_family("qwen3", ["Qwen3ForCausalLM", "qwen3"])
def parse(hf: dict) -> Architecture:
    return llama_like(hf, "qwen3", qk_layernorm=True, qkv_bias=bool(hf.get("attention_bias")))
