"""What a GGUF file yields once converted -- its Hugging Face config and tokenizer -- kept as
plain Hugging Face files, so that a run reads the GGUF metadata once instead of at every
start and in every place that asks (config check, architecture, engine config, tokenizer).

transformers parses the whole GGUF header and rebuilds the tokenizer from its vocabulary and
merges each time (many seconds for SmolLM2 on 2 cores); a saved ``tokenizer.json`` and
``config.json`` load in well under a second. Entries are keyed by the file's path, size,
modification time and the transformers version that converted it, and written atomically
(aside, then renamed), so concurrent ranks and edited files are safe.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from typing import Callable, Optional

CACHE_DIR = "~/.cache/repo-megatron/gguf"


def entry_dir(directory: str, name: str) -> str:
    """The cache directory of GGUF file ``directory/name`` in its current version."""
    import transformers

    path = os.path.abspath(os.path.join(directory, name))
    stat = os.stat(path)
    key = hashlib.sha1(f"{path}|{stat.st_size}|{stat.st_mtime_ns}|"
                       f"{transformers.__version__}".encode()).hexdigest()[:12]
    return os.path.join(os.path.expanduser(CACHE_DIR), f"{os.path.splitext(name)[0]}-{key}")


def _cached(out: str, write: Callable[[str], None]) -> Optional[str]:
    """``out``, written by ``write(tmp)`` into a temporary directory first if missing; None
    when the cache cannot be written (a read-only home): the caller converts in place."""
    if os.path.isdir(out):
        return out
    tmp = f"{out}.tmp-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        write(tmp)
        try:
            os.rename(tmp, out)
        except OSError:  # another process got there first
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        return None
    return out


def gguf_config_dict(directory: str, name: str) -> dict:
    """The HF config dict of GGUF file ``directory/name``."""
    from transformers import AutoConfig

    def write(tmp: str) -> None:
        AutoConfig.from_pretrained(directory, gguf_file=name).save_pretrained(tmp)

    out = _cached(os.path.join(entry_dir(directory, name), "config"), write)
    if out is None:
        return AutoConfig.from_pretrained(directory, gguf_file=name).to_dict()
    return AutoConfig.from_pretrained(out).to_dict()


def gguf_tokenizer(directory: str, name: str):
    """The tokenizer of GGUF file ``directory/name`` (with its chat template)."""
    from transformers import AutoTokenizer

    def write(tmp: str) -> None:
        AutoTokenizer.from_pretrained(directory, gguf_file=name).save_pretrained(tmp)

    out = _cached(os.path.join(entry_dir(directory, name), "tokenizer"), write)
    if out is None:
        return AutoTokenizer.from_pretrained(directory, gguf_file=name)
    return AutoTokenizer.from_pretrained(out)
