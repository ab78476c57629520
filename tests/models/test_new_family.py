"""A model family that is not Llama-like is one file and one registry line: its parser says
which norm, activation, MLP and biases it has, and the builder makes that GPTModel; its weight
mapping says which Hugging Face tensors each Megatron tensor is made of.

The family below (LayerNorm, a GELU MLP without a gate, biases on every linear layer) is
written to a temporary module and registered by importing it, as ``families/__init__.py``
imports the built-in ones. The model is Megatron-Core's own GPTModel; its MLP is checked
against the formula computed with plain torch; and the family runs one step of a run at TP2
(the dry run's step: old log-probs, the loss through Megatron's schedule, the optimizer step,
every weight synced under its Hugging Face name, a checkpoint saved and loaded)."""

import importlib
import json
import math
import sys
import textwrap

import pytest

from repo_megatron.models.architecture import FAMILIES, HF_NAMES, parse_hf_config
from repo_megatron.models.weight_mapping import WEIGHT_MAPPINGS
from tests.distributed import run_distributed

FAMILY_FILE = '''
"""GELU family: pre-LayerNorm, MLP fc2(gelu(fc1(x))) without a gate, linear biases."""

from repo_megatron.models.architecture import Architecture, register_family, rope_settings
from repo_megatron.models.weight_mapping import (ParamMapping, direct, embedding_and_head,
                                                 llama_attention, register_weight_mapping)


@register_family("gelu_test", ["GeluTestForCausalLM"])
def parse(hf: dict) -> Architecture:
    theta, scaling = rope_settings(hf)
    return Architecture(
        family="gelu_test", hf_architecture="GeluTestForCausalLM",
        num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"],
        ffn_hidden_size=hf["intermediate_size"], num_attention_heads=hf["num_attention_heads"],
        num_query_groups=hf["num_attention_heads"],
        head_dim=hf["hidden_size"] // hf["num_attention_heads"], vocab_size=hf["vocab_size"],
        max_position_embeddings=hf["max_position_embeddings"], rope_theta=theta,
        rope_scaling=scaling, layernorm_epsilon=hf["layer_norm_eps"],
        tie_word_embeddings=False, normalization="LayerNorm", activation="gelu",
        gated_linear_unit=False, add_bias_linear=True, qkv_bias=True)


@register_weight_mapping("gelu_test")
def weights(arch: Architecture) -> list[ParamMapping]:
    layer = "model.layers.{layer}."
    attention, mlp = "decoder.layers.self_attention.", "decoder.layers.mlp."
    hidden = lambda a: (a.hidden_size,)  # noqa: E731
    return [
        *embedding_and_head(arch), *llama_attention(qkv_bias=True),
        direct("decoder.final_layernorm.bias", "model.norm.bias", hidden),
        direct(attention + "linear_qkv.layer_norm_bias", layer + "input_layernorm.bias", hidden),
        direct(attention + "linear_proj.bias", layer + "self_attn.o_proj.bias", hidden),
        direct(mlp + "linear_fc1.layer_norm_weight", layer + "post_attention_layernorm.weight",
               hidden),
        direct(mlp + "linear_fc1.layer_norm_bias", layer + "post_attention_layernorm.bias",
               hidden),
        direct(mlp + "linear_fc1.weight", layer + "mlp.fc1.weight",
               lambda a: (a.ffn_hidden_size, a.hidden_size)),
        direct(mlp + "linear_fc1.bias", layer + "mlp.fc1.bias", lambda a: (a.ffn_hidden_size,)),
        direct(mlp + "linear_fc2.weight", layer + "mlp.fc2.weight",
               lambda a: (a.hidden_size, a.ffn_hidden_size)),
        direct(mlp + "linear_fc2.bias", layer + "mlp.fc2.bias", hidden)]
'''

HF_CONFIG = {"architectures": ["GeluTestForCausalLM"], "hidden_size": 32,
             "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
             "vocab_size": 64, "max_position_embeddings": 64, "layer_norm_eps": 1e-5}


def _register(module_dir: str) -> None:
    """The registry line: import the family's file."""
    sys.path.insert(0, module_dir)
    importlib.import_module("gelu_family")


def _build(module_dir: str) -> dict:
    """On one rank: register the family, build its GPTModel (local spec), report what it is."""
    import torch
    import torch.nn.functional as F

    from repo_megatron.config.model import ModelConfig
    from repo_megatron.config.parallel import ParallelConfig
    from repo_megatron.models.builder import build_model
    from repo_megatron.runtime.distributed import initialize

    _register(module_dir)
    arch = parse_hf_config(dict(HF_CONFIG))
    initialize(ParallelConfig(), seed=0)
    (model,) = build_model(arch, ModelConfig(transformer_impl="local"), ParallelConfig())
    layer = model.decoder.layers[0]
    mlp = layer.mlp
    x = torch.randn(5, 2, arch.hidden_size)                                 # [seq, batch, hidden]
    out, out_bias = mlp(x)
    w1, b1 = mlp.linear_fc1.weight, mlp.linear_fc1.bias
    w2, b2 = mlp.linear_fc2.weight, mlp.linear_fc2.bias
    expected = F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)
    tokens = torch.randint(0, arch.vocab_size, (2, 7))
    logits = model(tokens, torch.arange(7).expand(2, 7), None)
    config = model.config
    return {
        "config": (config.normalization, config.activation_func is F.gelu,
                   config.gated_linear_unit, config.add_bias_linear, config.layernorm_epsilon),
        "norms": sorted({type(m).__name__ for m in (layer.input_layernorm,
                                                    layer.pre_mlp_layernorm,
                                                    model.decoder.final_layernorm)}),
        "norm_has_bias": layer.input_layernorm.bias is not None,
        "fc1": (tuple(w1.shape), tuple(b1.shape)),
        "qkv_bias": layer.self_attention.linear_qkv.bias is not None,
        "mlp_error": float((out + out_bias - expected).abs().max()),
        "logits": (tuple(logits.shape), bool(torch.isfinite(logits).all())),
    }


@pytest.fixture
def scratch_family_registries(monkeypatch):
    """Registers the test family here without leaving it behind."""
    monkeypatch.setattr(FAMILIES, "_entries", dict(FAMILIES._entries))
    monkeypatch.setattr(HF_NAMES, "_entries", dict(HF_NAMES._entries))
    monkeypatch.setattr(WEIGHT_MAPPINGS, "_entries", dict(WEIGHT_MAPPINGS._entries))
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield
    sys.modules.pop("gelu_family", None)


def test_a_gelu_layernorm_family_is_one_file_and_builds_its_gpt_model(tmp_path,
                                                                     scratch_family_registries):
    (tmp_path / "gelu_family.py").write_text(textwrap.dedent(FAMILY_FILE))
    _register(str(tmp_path))
    arch = parse_hf_config(dict(HF_CONFIG))
    assert (arch.family, arch.normalization, arch.activation, arch.gated_linear_unit,
            arch.add_bias_linear) == ("gelu_test", "LayerNorm", "gelu", False, True)

    (built,) = run_distributed(_build, 1, str(tmp_path))
    assert built["config"] == ("LayerNorm", True, False, True, 1e-5)
    # torch's LayerNorm here, apex's FusedLayerNorm or TE's LayerNorm elsewhere; not RMSNorm
    assert built["norms"] and all(name.endswith("LayerNorm") for name in built["norms"])
    assert built["norm_has_bias"] and built["qkv_bias"]
    assert built["fc1"] == ((48, 32), (48,))          # no gate: ffn rows, not 2 * ffn
    assert built["mlp_error"] < 1e-5
    assert built["logits"] == ((2, 7, 128), True)        # vocabulary padded to 128


def _one_step_run(module_dir: str, cfg) -> dict:
    from repo_megatron.run.dry_run import run_step

    _register(module_dir)
    return run_step(cfg, "WARNING")


def test_the_family_runs_one_step_of_a_run(tmp_path, scratch_family_registries):
    from repo_megatron.config import config_from_dict
    from repo_megatron.run.dry_run import RANK_IMPORTS, dry_config, verdict

    (tmp_path / "gelu_family.py").write_text(textwrap.dedent(FAMILY_FILE))
    _register(str(tmp_path))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(HF_CONFIG))
    cfg = config_from_dict({"model": {"hf_path": str(model), "random_init": True,
                                      "transformer_impl": "local"},
                            "parallel": {"tensor_model_parallel_size": 2}})
    scaled, _ = dry_config(cfg, str(tmp_path / "run"))
    results = run_distributed(_one_step_run, 2, str(tmp_path), scaled, timeout=600,
                              preload=RANK_IMPORTS)
    # one loss on both ranks, the checkpoint brings the state back, and the weight sync
    # delivered every parameter (the LayerNorm and linear biases, the ungated fc1 included)
    assert verdict(results, scaled) == []
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in results)
