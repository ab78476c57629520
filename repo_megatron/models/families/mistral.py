"""Mistral (Llama layout; sliding-window attention is not supported beyond the window)."""

from ..architecture import Architecture, llama_like, register_family


@register_family("mistral", ["MistralForCausalLM", "mistral"])
def parse(hf: dict) -> Architecture:
    return llama_like(hf, "mistral")
