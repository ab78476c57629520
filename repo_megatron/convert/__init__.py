"""Checkpoint conversion between Hugging Face and Megatron-Core, and the weight mapping that
weight sync shares with it.

- :func:`convert_hf_to_megatron` / :func:`convert_megatron_to_hf`: streaming converters
  (``repo-megatron convert ...``, ``tools/convert_*.py``).
- :func:`megatron_to_hf_named_tensors`: this rank's parameters as full HF tensors.
- :mod:`.mapping`: per-family :class:`ParamMapping` registry (families live in
  ``models/families/``), :mod:`.transforms`: the pure layout transforms.
"""

from .hf_to_megatron import convert_hf_to_megatron
from .mapping import ModelDims, ParamMapping, mappings_for, register_weight_mapping
from .megatron_to_hf import convert_megatron_to_hf
from .weight_sync import megatron_to_hf_named_tensors

__all__ = ["convert_hf_to_megatron", "convert_megatron_to_hf", "megatron_to_hf_named_tensors",
           "ModelDims", "ParamMapping", "mappings_for", "register_weight_mapping"]
