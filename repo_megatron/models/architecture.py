"""The transformer shape of a Hugging Face decoder model, read from its ``config.json``.

Pure data (no Megatron): the config validator, the model builder, the converters and the
memory planner all read a model's shape from here, and the builder its transformer settings
(norm, activation, gated MLP, biases, QK norm), so that a family that is not Llama-like is
still one file. A leaf: each supported family registers its parser here from ``families/``
(one file per family), which ``repo_megatron.models`` imports.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ..errors import ConfigError
from ..hf_files import load_hf_config_dict
from ..registry import Registry


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling (``rope_type: llama3``)."""
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class Architecture:
    family: str                      # registered family name: llama, mistral, qwen2, qwen3
    hf_architecture: str             # e.g. LlamaForCausalLM
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int            # KV heads (GQA)
    head_dim: int                    # kv_channels
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    layernorm_epsilon: float         # HF rms_norm_eps / layer_norm_eps
    tie_word_embeddings: bool
    # Transformer settings, in Megatron's TransformerConfig terms; the defaults are the
    # Llama-like ones (pre-RMSNorm, SwiGLU MLP, no linear biases).
    normalization: str = "RMSNorm"   # or "LayerNorm"
    activation: str = "silu"         # MLP activation, by name (models.builder.ACTIVATIONS)
    gated_linear_unit: bool = True   # fc1 = [gate; up], act(gate) * up: SwiGLU with silu
    add_bias_linear: bool = False    # biases on every linear layer (QKV: qkv_bias)
    qkv_bias: bool = False           # Qwen2
    qk_layernorm: bool = False       # Qwen3
    rope_scaling: Optional[RopeScaling] = None
    # Sliding-window attention (Mistral, Qwen): a query sees itself and the sliding_window - 1
    # positions before it, in the layers marked True in sliding_window_layers (None: all).
    sliding_window: Optional[int] = None
    sliding_window_layers: Optional[tuple[bool, ...]] = None

    def replace(self, **changes: Any) -> "Architecture":
        return dataclasses.replace(self, **changes)


# family name -> parser(hf_config dict) -> Architecture
FAMILIES: Registry[Callable[[dict], Architecture]] = Registry("model family", "family")
# HF "architectures" entry / model_type -> family name
HF_NAMES: Registry[str] = Registry("Hugging Face architecture", "config.json architectures")


def register_family(name: str, hf_names: list[str]):
    """Decorator: register a parser for the HF architectures / model types in ``hf_names``."""
    def wrap(fn: Callable[[dict], Architecture]) -> Callable[[dict], Architecture]:
        FAMILIES.register(name)(fn)
        for hf_name in hf_names:
            HF_NAMES.register(hf_name)(name)
        return fn
    return wrap


def rope_settings(hf: dict) -> tuple[float, Optional[RopeScaling]]:
    """rope_theta and llama3 scaling from either transformers 4.x (``rope_theta`` +
    ``rope_scaling``) or 5.x (``rope_parameters``) configs."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    merged = {**scaling, **params}
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type in (None, "default"):
        return float(theta), None
    if rope_type != "llama3":
        raise ConfigError(f"config.json: rope_type={rope_type} is not supported (default, llama3)")
    return float(theta), RopeScaling(
        factor=float(merged["factor"]),
        low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
        high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(merged.get("original_max_position_embeddings", 8192)),
    )


def sliding_window(hf: dict, per_layer: bool) -> dict[str, Any]:
    """The ``sliding_window`` / ``sliding_window_layers`` fields, read as transformers reads
    them: Mistral (``per_layer=False``) applies ``sliding_window`` to every layer; Qwen2/3 only
    with ``use_sliding_window``, in the layers ``layer_types`` marks ``sliding_attention``
    (default: layers from ``max_window_layers`` on)."""
    window = hf.get("sliding_window")
    if window is None or (per_layer and not hf.get("use_sliding_window", False)):
        return {}
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ConfigError(f"config.json: sliding_window={window} must be a positive integer")
    if not per_layer:
        return {"sliding_window": window}
    layers = int(hf["num_hidden_layers"])
    types = hf.get("layer_types") or [
        "sliding_attention" if i >= int(hf.get("max_window_layers", 28)) else "full_attention"
        for i in range(layers)]
    if len(types) != layers or set(types) - {"sliding_attention", "full_attention"}:
        raise ConfigError(f"config.json: layer_types must list sliding_attention / "
                          f"full_attention for each of the {layers} layers")
    marks = tuple(t == "sliding_attention" for t in types)
    if not any(marks):
        return {}
    return {"sliding_window": window, "sliding_window_layers": None if all(marks) else marks}


def llama_like(hf: dict, family: str, **extra: Any) -> Architecture:
    """The fields every Llama-derived family shares."""
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"config.json: hidden_act={act} is not supported (SwiGLU needs silu)")
    heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    theta, scaling = rope_settings(hf)
    arch = (hf.get("architectures") or [family])[0]
    return Architecture(
        family=family,
        hf_architecture=arch,
        num_layers=int(hf["num_hidden_layers"]),
        hidden_size=hidden,
        ffn_hidden_size=int(hf["intermediate_size"]),
        num_attention_heads=heads,
        num_query_groups=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hidden // heads),
        vocab_size=int(hf["vocab_size"]),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        rope_theta=theta,
        layernorm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        rope_scaling=scaling,
        **extra,
    )


def parse_hf_config(hf: dict, source: str = "config.json") -> Architecture:
    """An :class:`Architecture` from a HF config dict; unknown families are a ConfigError."""
    names = list(hf.get("architectures") or []) + [hf.get("model_type", "")]
    for name in names:
        if name in HF_NAMES:
            try:
                return FAMILIES[HF_NAMES[name]](hf)
            except KeyError as e:
                raise ConfigError(f"missing key {e.args[0]}", source) from None
            except ConfigError as e:
                raise ConfigError(e.message.removeprefix("config.json: "), source) from None
            except (TypeError, ValueError, ArithmeticError) as e:  # a value of the wrong kind
                raise ConfigError(f"cannot be read ({type(e).__name__}: {e})", source) from None
    raise ConfigError(f"architecture {names[0] if names else '?'} is not supported "
                      f"(supported: {', '.join(HF_NAMES)})", source)


def read_architecture(hf_path: str, gguf_file: Optional[str] = None,
                      overrides: Optional[dict] = None) -> Architecture:
    """Read and parse a model's architecture, applying config.json key overrides."""
    from .hf_checks import check_override_keys, check_shape

    hf = load_hf_config_dict(hf_path, gguf_file)
    source = os.path.join(hf_path or "", gguf_file or "config.json")
    overrides = overrides or {}
    check_override_keys(overrides, hf)
    hf.update(overrides)
    check_shape(hf, set(overrides), source)
    return parse_hf_config(hf, source=source)


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_model_parallel_size: int) -> int:
    """Vocabulary padded to a multiple of ``divisible_by * TP`` (Megatron's convention)."""
    multiple = divisible_by * tensor_model_parallel_size
    return ((vocab_size + multiple - 1) // multiple) * multiple
