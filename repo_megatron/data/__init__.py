"""Prompt datasets (local jsonl/parquet through Hugging Face ``datasets``), the chat template,
and a synthetic hard-sample task with worked solutions."""

from .chat import ChatFormatter, load_tokenizer
from .dataset import DataError, load_prompts

__all__ = ["ChatFormatter", "DataError", "load_prompts", "load_tokenizer"]
