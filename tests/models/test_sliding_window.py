"""Sliding-window attention is read from config.json exactly as transformers reads it (the
config classes are the oracle) and becomes Megatron's ``window_size`` /
``window_attn_skip_freq``. Log-prob parity with transformers is in
tests/convert/test_logits_parity.py (families ``mistral_swa`` and ``qwen2_swa``)."""

import pytest
import transformers

from repo_megatron.config.model import ModelConfig
from repo_megatron.config.parallel import ParallelConfig
from repo_megatron.errors import ConfigError
from repo_megatron.models import builder
from repo_megatron.models.architecture import parse_hf_config

SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=100)


def _arch(config_cls: str, **fields):
    """Our Architecture of the config.json that transformers' own config class writes."""
    config = getattr(transformers, config_cls)(**SHAPE, **fields).to_dict()
    return parse_hf_config(config), config


def _transformers_sliding_layers(config: dict) -> tuple[bool, ...]:
    """Which layers transformers gives a sliding window (Qwen2/3: ``layer_types``)."""
    return tuple(t == "sliding_attention" for t in config["layer_types"])


def test_mistral_window_applies_to_every_layer():
    arch, _ = _arch("MistralConfig", sliding_window=7)
    assert arch.sliding_window == 7 and arch.sliding_window_layers is None
    assert _arch("MistralConfig", sliding_window=None)[0].sliding_window is None


@pytest.mark.parametrize("config_cls", ["Qwen2Config", "Qwen3Config"])
def test_qwen_window_follows_layer_types(config_cls):
    arch, config = _arch(config_cls, use_sliding_window=True, sliding_window=5,
                         max_window_layers=2)
    assert arch.sliding_window == 5
    assert arch.sliding_window_layers == _transformers_sliding_layers(config) == \
        (False, False, True, True)
    # Every layer sliding: no per-layer list.
    arch, _ = _arch(config_cls, use_sliding_window=True, sliding_window=5, max_window_layers=0)
    assert arch.sliding_window == 5 and arch.sliding_window_layers is None


@pytest.mark.parametrize("config_cls", ["Qwen2Config", "Qwen3Config"])
def test_qwen_window_is_off_without_use_sliding_window(config_cls):
    arch, config = _arch(config_cls, use_sliding_window=False, sliding_window=5)
    assert arch.sliding_window is None and not any(_transformers_sliding_layers(config))


def test_qwen_window_without_layer_types_uses_max_window_layers():
    config = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
              "num_hidden_layers": 4, "hidden_size": 64, "intermediate_size": 128,
              "num_attention_heads": 4, "vocab_size": 100, "use_sliding_window": True,
              "sliding_window": 3, "max_window_layers": 3}
    assert parse_hf_config(config).sliding_window_layers == (False, False, False, True)


@pytest.mark.parametrize("fields, message", [
    (dict(sliding_window=0), "sliding_window=0 must be a positive integer"),
    (dict(layer_types=["sliding_attention"] * 3), "layer_types must list"),
])
def test_bad_window_settings_are_one_line_errors(fields, message):
    config = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
              "num_hidden_layers": 4, "hidden_size": 64, "intermediate_size": 128,
              "num_attention_heads": 4, "vocab_size": 100, "use_sliding_window": True,
              "sliding_window": 3, **fields}
    with pytest.raises(ConfigError, match=message):
        parse_hf_config(config)


def test_megatron_window_is_transformers_window_minus_one():
    """transformers keeps key j for query i when j > i - W; Megatron's window (left, right)
    keeps i - left <= j <= i + right: left = W - 1, right = 0."""
    arch, _ = _arch("Qwen2Config", use_sliding_window=True, sliding_window=5,
                    max_window_layers=2)
    config = builder.transformer_config(arch, ModelConfig(transformer_impl="local"),
                                        ParallelConfig(), "local")
    assert config.window_size == (4, 0)
    assert config.window_attn_skip_freq == [0, 0, 1, 1]
    plain, _ = _arch("MistralConfig", sliding_window=None)
    config = builder.transformer_config(plain, ModelConfig(transformer_impl="local"),
                                        ParallelConfig(), "local")
    assert config.window_size is None
