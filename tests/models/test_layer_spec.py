"""The layer spec is chosen explicitly: TE (with FP8 fields) when TE and a GPU are present,
local otherwise; asking for TE or FP8 where it cannot run is an error, never a fallback."""

import pytest
import torch

from repo_megatron.config.model import ModelConfig
from repo_megatron.config.parallel import ParallelConfig
from repo_megatron.errors import ConfigError
from repo_megatron.models import builder
from repo_megatron.models.architecture import RopeScaling, parse_hf_config
from tests.helpers import write_tiny_llama


@pytest.fixture
def arch(tmp_path):
    import json
    write_tiny_llama(str(tmp_path))
    return parse_hf_config(json.load(open(tmp_path / "config.json")))


def _pretend(monkeypatch, te: bool, gpu: bool):
    monkeypatch.setattr(builder, "te_available", lambda: te)
    monkeypatch.setattr(builder.cpu_compat, "has_gpu", lambda: gpu)


def test_auto_is_local_without_gpu(monkeypatch):
    _pretend(monkeypatch, te=True, gpu=False)
    assert builder.select_transformer_impl(ModelConfig()) == "local"


def test_auto_is_te_with_te_and_gpu(monkeypatch):
    _pretend(monkeypatch, te=True, gpu=True)
    assert builder.select_transformer_impl(ModelConfig()) == "transformer_engine"


def test_explicit_te_without_gpu_is_an_error(monkeypatch):
    _pretend(monkeypatch, te=True, gpu=False)
    with pytest.raises(ConfigError, match="model.transformer_impl=transformer_engine but no GPU"):
        builder.select_transformer_impl(ModelConfig(transformer_impl="transformer_engine"))


def test_fp8_without_te_is_an_error(monkeypatch):
    _pretend(monkeypatch, te=False, gpu=True)
    with pytest.raises(ConfigError, match="model.fp8=e4m3 needs Transformer Engine"):
        builder.select_transformer_impl(ModelConfig(fp8="e4m3", params_dtype="bf16"))


def test_fp8_fields_reach_transformer_config(monkeypatch, arch):
    _pretend(monkeypatch, te=True, gpu=True)
    cfg = ModelConfig(fp8="hybrid", fp8_recipe="tensorwise", params_dtype="bf16",
                      num_layers_at_start_in_bf16=1, num_layers_at_end_in_bf16=1)
    tc = builder.transformer_config(arch, cfg, ParallelConfig(), "transformer_engine")
    assert (tc.fp8, tc.fp8_recipe, tc.first_last_layers_bf16) == ("hybrid", "tensorwise", True)
    assert (tc.num_layers_at_start_in_bf16, tc.num_layers_at_end_in_bf16) == (1, 1)
    assert tc.bf16 and tc.params_dtype is torch.bfloat16


def test_te_spec_is_requested_with_fp8(monkeypatch, arch):
    seen = {}
    import megatron.core.models.gpt.gpt_layer_specs as specs
    monkeypatch.setattr(specs, "get_gpt_layer_with_transformer_engine_spec",
                        lambda **kw: seen.setdefault("te", kw))
    builder.layer_spec(arch, "transformer_engine", ModelConfig(fp8="e4m3", params_dtype="bf16"))
    assert seen["te"] == {"qk_layernorm": False, "fp8": "e4m3"}


def test_llama3_inv_freq_matches_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    hf = LlamaConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=131072,
                     rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 8192},
                     rope_theta=500000.0)
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    ours = builder.llama3_inv_freq(64, 500000.0, RopeScaling(32.0, 1.0, 4.0, 8192))
    assert torch.allclose(ours, ref.float(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("parallel, fp8, recipe, multiple", [
    (dict(), None, "delayed", 1),
    (dict(tensor_model_parallel_size=8), None, "delayed", 1),            # TP alone: no split
    (dict(tensor_model_parallel_size=8, sequence_parallel=True), None, "delayed", 8),
    (dict(tensor_model_parallel_size=8), "e4m3", "tensorwise", 16),
    (dict(tensor_model_parallel_size=8), "e4m3", "mxfp8", 32),
    # sequence parallel + FP8: each TP share of the sequence is FP8-aligned
    (dict(tensor_model_parallel_size=2, sequence_parallel=True), "hybrid", "delayed", 32),
    (dict(tensor_model_parallel_size=4, sequence_parallel=True), "e4m3", "mxfp8", 128),
], ids=["plain", "tp8", "tp8-sp", "fp8", "mxfp8", "sp2-fp8", "sp4-mxfp8"])
def test_sequence_length_multiple_of_layout_and_precision(parallel, fp8, recipe, multiple):
    model = ModelConfig(fp8=fp8, fp8_recipe=recipe, params_dtype="bf16")
    got = builder.sequence_length_multiple(model, ParallelConfig(**parallel))
    assert got == multiple
    tp = parallel.get("tensor_model_parallel_size", 1)
    if parallel.get("sequence_parallel"):
        assert got % tp == 0  # Megatron splits the sequence over the TP ranks
