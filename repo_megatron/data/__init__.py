"""Prompt datasets (local jsonl/parquet files or Hugging Face datasets, one source or a
weighted mixture), the chat template, and a synthetic hard-sample task with worked solutions.

Importing this package loads none of its submodules: each name below is imported on first use.
Its errors are :class:`repo_megatron.errors.DataError`."""

from __future__ import annotations

from ..lazy_exports import lazy_getattr

_EXPORTS = {"ChatFormatter": ".chat", "load_tokenizer": ".chat", "load_prompts": ".dataset",
            "load_sources": ".dataset", "Source": ".sources", "resolve_sources": ".sources"}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
