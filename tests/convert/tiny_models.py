"""Tiny random Hugging Face models of each supported family, saved with ``save_pretrained``."""

from __future__ import annotations

import os

import torch

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
              rms_norm_eps=1e-5)

# family -> (config class name, model class name, config overrides)
FAMILIES = {
    # Llama 3 RoPE scaling; a vocabulary that no TP size > 1 divides.
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(vocab_size=1001, rope_parameters=dict(
        rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0,
        high_freq_factor=4.0, original_max_position_embeddings=64))),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(vocab_size=1000, sliding_window=None)),
    # QKV bias and tied embeddings.
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(vocab_size=1000, tie_word_embeddings=True)),
    # Per-head q/k RMSNorm.
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(vocab_size=1000)),
    # Sliding windows shorter than the test sequences: every layer (Mistral), and only the
    # layers from max_window_layers on (Qwen2's layer_types).
    "mistral_swa": ("MistralConfig", "MistralForCausalLM", dict(vocab_size=1000, sliding_window=5)),
    "qwen2_swa": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        vocab_size=1000, use_sliding_window=True, sliding_window=4, max_window_layers=2)),
}


def make_tiny_model(family: str, directory: str, seed: int = 0, **overrides) -> str:
    """Save a tiny random ``family`` model (fp32) in ``directory``. Every weight is random,
    norms around 1, so a mapping that swaps or mis-orders anything changes the outputs."""
    import transformers

    config_cls, model_cls, extra = FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if "norm" in name else 0.0
            p.copy_(base + 0.1 * torch.randn_like(p))
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory)
    return directory


def hf_logprobs(directory: str, tokens: torch.Tensor, gguf_file=None) -> torch.Tensor:
    """transformers' next-token log-probs [b, s - 1] (fp32, eager attention)."""
    from transformers import AutoModelForCausalLM

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager",
                                                 dtype=torch.float32, **kwargs).eval()
    with torch.no_grad():
        logits = model(tokens).logits.float()
    return torch.log_softmax(logits[:, :-1], -1).gather(-1, tokens[:, 1:, None])[..., 0]
