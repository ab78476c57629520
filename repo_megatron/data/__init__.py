"""Prompt datasets (local jsonl/parquet files or Hugging Face datasets, one source or a
weighted mixture), the chat template, and a synthetic hard-sample task with worked solutions."""

from .chat import ChatFormatter, load_tokenizer
from .dataset import DataError, load_prompts, load_sources
from .sources import Source, resolve_sources

__all__ = ["ChatFormatter", "DataError", "Source", "load_prompts", "load_sources",
           "load_tokenizer", "resolve_sources"]
