"""FP8 plumbing: early checks of the fp8 keys, token padding for FP8 GEMMs, and (GPU only) a
Transformer Engine model that runs its layers in FP8 while log-probs stay fp32."""

import json

import pytest
import torch

from repo_megatron.config.model import ModelConfig
from repo_megatron.config.parallel import ParallelConfig
from repo_megatron.errors import ConfigError
from repo_megatron.models import builder
from repo_megatron.models.architecture import parse_hf_config
from repo_megatron.models.fp8 import check_fp8, fp8_padded_length
from repo_megatron.runtime import cpu_compat
# At the top, not inside the GPU-only test: a broken import fails collection on CPU too.
from tests.distributed import free_port
from tests.helpers import write_tiny_llama

FP8 = dict(fp8="e4m3", params_dtype="bf16", transformer_impl="transformer_engine")


@pytest.fixture
def arch(tmp_path):
    write_tiny_llama(str(tmp_path))
    return parse_hf_config(json.load(open(tmp_path / "config.json")))


def test_padding_to_16_tokens_32_for_mxfp8():
    assert [fp8_padded_length(n, "tensorwise") for n in (1, 16, 17, 100)] == [16, 16, 32, 112]
    assert fp8_padded_length(100, "mxfp8") == 128
    assert fp8_padded_length(16, "blockwise") == 16


def test_sequence_parallel_pads_each_tp_share():
    # each of TP 4 ranks holds seq / 4 tokens, which must itself be a multiple of 16
    assert fp8_padded_length(100, "delayed", tensor_model_parallel_size=4,
                             sequence_parallel=True) == 128
    assert fp8_padded_length(100, "delayed", tensor_model_parallel_size=4) == 112


def test_delayed_recipe_cannot_keep_layers_in_bf16():
    with pytest.raises(ConfigError, match="model.fp8_recipe=delayed cannot keep layers in bf16"):
        check_fp8(ModelConfig(**FP8, num_layers_at_end_in_bf16=1), ParallelConfig(), 4)


def test_bf16_layers_at_most_one_stage():
    cfg = ModelConfig(**FP8, fp8_recipe="tensorwise", num_layers_at_start_in_bf16=3)
    with pytest.raises(ConfigError, match="num_layers_at_start_in_bf16=3 exceeds the 2 layers"):
        check_fp8(cfg, ParallelConfig(pipeline_model_parallel_size=2), 4)
    check_fp8(cfg, ParallelConfig(), 4)


def test_fp8_keys_are_ignored_without_fp8():
    check_fp8(ModelConfig(num_layers_at_start_in_bf16=9), ParallelConfig(), 4)


def test_builder_checks_fp8_before_megatron(monkeypatch, arch):
    monkeypatch.setattr(builder, "te_available", lambda: True)
    monkeypatch.setattr(builder.cpu_compat, "has_gpu", lambda: True)
    cfg = ModelConfig(**FP8, num_layers_at_start_in_bf16=1)  # delayed is the default recipe
    with pytest.raises(ConfigError, match="fp8_recipe=delayed"):
        builder.transformer_config(arch, cfg, ParallelConfig(), "transformer_engine")


def test_fp8_param_gather_reaches_transformer_config(monkeypatch, arch):
    monkeypatch.setattr(builder, "te_available", lambda: True)
    monkeypatch.setattr(builder.cpu_compat, "has_gpu", lambda: True)
    cfg = ModelConfig(**FP8, fp8_recipe="blockwise", fp8_param_gather=True)
    tc = builder.transformer_config(arch, cfg, ParallelConfig(), "transformer_engine")
    assert (tc.fp8, tc.fp8_recipe, tc.fp8_param, tc.first_last_layers_bf16) == \
        ("e4m3", "blockwise", True, False)


@pytest.mark.gpu
def test_te_fp8_model_forward_keeps_logprobs_fp32(tmp_path):
    if not (cpu_compat.has_gpu() and builder.te_available()):
        pytest.skip("needs a GPU (sm90+) and Transformer Engine")
    from repo_megatron.runtime.distributed import LaunchEnv, initialize, teardown
    from repo_megatron.trainer.forward import forward_logprobs
    from repo_megatron.trainer.micro_batch import MicroBatch

    # FP8 GEMMs need dimensions that are multiples of 16: hidden 64, FFN 128, head_dim 16.
    write_tiny_llama(str(tmp_path))
    arch = parse_hf_config(json.load(open(tmp_path / "config.json")))
    cfg = ModelConfig(**FP8, fp8_recipe="tensorwise", num_layers_at_start_in_bf16=1,
                      num_layers_at_end_in_bf16=1)
    initialize(ParallelConfig(), seed=3, env=LaunchEnv(0, 1, 0, "127.0.0.1", free_port(), "single"))
    try:
        model = builder.build_model(arch, cfg, ParallelConfig())
        assert model[0].config.fp8 == "e4m3" and model[0].config.first_last_layers_bf16
        seq = fp8_padded_length(21, "tensorwise")
        tokens = torch.randint(0, arch.vocab_size, (2, seq))
        (logp,) = forward_logprobs(model, [MicroBatch(tokens=tokens)])
        assert logp.dtype == torch.float32 and logp.shape == (2, seq)
        assert torch.isfinite(logp).all() and (logp <= 0).all()
    finally:
        teardown()
