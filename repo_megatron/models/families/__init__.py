"""One file per model family; importing this package registers them all."""

from . import llama, mistral, qwen2, qwen3  # noqa: F401
