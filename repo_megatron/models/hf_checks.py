"""Checks of a Hugging Face config dict before it becomes a model: ``model.architecture_overrides``
keys must exist, shape values must be positive integers (or positive numbers) that fit
together. Errors are one line naming the override key, or the config file for its own values.

Which keys exist is transformers' answer (the model type's config class), plus the keys the
model's config file has and the ones our family parsers read.
"""

from __future__ import annotations

import difflib
import math
from typing import Any, Mapping

from ..config.base import fmt
from ..errors import ConfigError

# config.json key -> (kind, what it must be): what the family parsers read
SHAPE_KEYS: dict[str, tuple[str, str]] = {
    "num_hidden_layers": ("int", "an integer >= 1"),
    "hidden_size": ("int", "an integer >= 1"),
    "intermediate_size": ("int", "an integer >= 1"),
    "num_attention_heads": ("int", "an integer >= 1"),
    "num_key_value_heads": ("int", "an integer >= 1"),
    "head_dim": ("int", "an integer >= 1"),
    "vocab_size": ("int", "an integer >= 1"),
    "max_position_embeddings": ("int", "an integer >= 1"),
    "rope_theta": ("positive", "a finite number > 0"),
    "rms_norm_eps": ("positive", "a finite number > 0"),
    "tie_word_embeddings": ("bool", "true or false"),
    "architectures": ("names", "a list of class names"),
    "model_type": ("name", "a name"),
    "rope_scaling": ("mapping", "a mapping"),
    "rope_parameters": ("mapping", "a mapping"),
}
_PARSED_KEYS = set(SHAPE_KEYS) | {"architectures", "model_type", "hidden_act", "rope_scaling",
                                  "rope_parameters", "attention_bias", "qkv_bias", "torch_dtype"}


def _known_keys(hf: Mapping[str, Any], model_type: Any) -> tuple[str, set[str]]:
    """(config class name, keys a config of ``model_type`` may have, given the file's ``hf``)."""
    known = set(hf) | _PARSED_KEYS
    try:
        from transformers import CONFIG_MAPPING
        cls = CONFIG_MAPPING[model_type]
    except (ImportError, KeyError, TypeError):  # TypeError: a model_type that is no string
        return "the model's config", known
    return cls.__name__, known | set(cls().to_dict()) | set(getattr(cls, "attribute_map", {}))


def check_override_keys(overrides: Mapping[str, Any], hf: Mapping[str, Any]) -> None:
    """Every key of ``overrides`` is a key of the (overridden) config's model type."""
    if not overrides:
        return  # nothing to check: transformers (seconds to import) is not asked
    name, known = _known_keys(hf, overrides.get("model_type", hf.get("model_type")))
    for key in overrides:
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"model.architecture_overrides.{key} is not a key of {name}{hint}")


def _valid(kind: str, value: Any) -> bool:
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "mapping":
        return isinstance(value, dict)
    if kind == "name":
        return isinstance(value, str)
    if kind == "names":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if kind == "int":
        return isinstance(value, int) and value >= 1
    try:
        return math.isfinite(value) and value > 0
    except OverflowError:       # an int beyond the float range: no usable float
        return False


def check_shape(hf: Mapping[str, Any], overridden: set, source: str) -> None:
    """Shape values of ``hf`` (after overrides) are well-formed and consistent. Errors name
    ``model.architecture_overrides.KEY`` for overridden keys, else ``source`` (config.json)."""
    def where(key: str) -> str:
        return f"model.architecture_overrides.{key}" if key in overridden else key

    def fail(message: str, key: str) -> None:
        raise ConfigError(message) if key in overridden else ConfigError(message, source)

    for key, (kind, must) in SHAPE_KEYS.items():
        value = hf.get(key)
        if value is not None and not _valid(kind, value):
            fail(f"{where(key)}={fmt(value)} must be {must}", key)
    heads, kv = hf.get("num_attention_heads"), hf.get("num_key_value_heads")
    if heads and kv and heads % kv:
        key = "num_key_value_heads" if "num_key_value_heads" in overridden else "num_attention_heads"
        fail(f"{where('num_attention_heads')}={heads} is not a multiple of "
             f"{where('num_key_value_heads')}={kv} (grouped-query attention)", key)
    hidden = hf.get("hidden_size")
    if heads and hidden and not hf.get("head_dim") and hidden % heads:
        key = "num_attention_heads" if "num_attention_heads" in overridden else "hidden_size"
        fail(f"{where('hidden_size')}={hidden} is not a multiple of "
             f"{where('num_attention_heads')}={heads} (and no head_dim is given)", key)
