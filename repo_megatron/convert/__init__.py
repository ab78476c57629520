"""Checkpoint conversion between Hugging Face and Megatron-Core.

- :func:`convert_hf_to_megatron` (:mod:`.hf_to_megatron`) / :func:`convert_megatron_to_hf`
  (:mod:`.megatron_to_hf`): streaming converters (``repo-megatron convert ...``,
  ``tools/convert_*.py``).

The weight mapping they share lives in :mod:`repo_megatron.models.weight_mapping`; the live
model's parameters as Hugging Face tensors (weight sync, the HF export) in
:mod:`repo_megatron.weight_sync.plan`. Importing this package loads none of its submodules:
each name above is imported on first use.
"""

from __future__ import annotations

from ..lazy_exports import lazy_getattr

_EXPORTS = {"convert_hf_to_megatron": ".hf_to_megatron",
            "convert_megatron_to_hf": ".megatron_to_hf"}

__all__ = list(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
