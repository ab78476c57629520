"""The run's conversion cache: the Hugging Face (or GGUF) model of ``model.hf_path`` /
``model.gguf_file`` converted to a torch_dist checkpoint once, under ``model.cache_dir``, and
reused by every later run of the same model and vocabulary padding.

An entry is named by the model's directory name, a hash of its source and the padded
vocabulary size (the only layout choice a torch_dist checkpoint bakes in: it loads into any
TP/PP/DP layout otherwise). Rank 0 converts while the other ranks wait on the control plane;
runs started together (a sweep, the benchmarks' parallel arms) take a file lock per entry, so
one converts and the others reuse its copy.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os

import torch

from ..config import Config
from ..errors import OutputExistsError
from ..models.architecture import padded_vocab_size
from ..runtime import control

log = logging.getLogger(__name__)


def _rank() -> int:
    return torch.distributed.get_rank()


def converted_checkpoint(cfg: Config, arch) -> str:
    """The torch_dist checkpoint of ``model.hf_path`` / ``model.gguf_file`` for this run's
    vocabulary padding, converted on first use into ``model.cache_dir`` (atomically: a
    temporary directory renamed into place) and reused afterwards. Collective: every rank
    calls it and gets the path once rank 0's conversion is complete."""
    from . import convert_hf_to_megatron

    m, tp = cfg.model, cfg.parallel.tensor_model_parallel_size
    source = os.path.abspath(m.hf_path) if m.hf_path else ""
    name = os.path.basename(source.rstrip("/")) or os.path.splitext(m.gguf_file or "model")[0]
    key = hashlib.sha1(f"{source}|{m.gguf_file}".encode()).hexdigest()[:10]
    vocab = padded_vocab_size(arch.vocab_size, m.make_vocab_size_divisible_by, tp)
    out = os.path.join(os.path.expanduser(m.cache_dir), f"{name}-{key}-vocab{vocab}")
    if _rank() == 0 and not os.path.isdir(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
        # One conversion per cache entry at a time: runs started together wait for the first
        # one and reuse its copy.
        with open(out + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not os.path.isdir(out):
                log.info("Converting %s to Megatron torch_dist (first use) -> %s",
                         m.gguf_file or source, out)
                # Written aside and renamed into place: out exists only once complete.
                try:
                    convert_hf_to_megatron(
                        m.hf_path, out, tp=tp, gguf_file=m.gguf_file,
                        make_vocab_size_divisible_by=m.make_vocab_size_divisible_by)
                except OutputExistsError:  # a run without the lock converted it first
                    log.info("%s was converted by another process meanwhile: using it", out)
    control.barrier()  # the others wait for rank 0's conversion (hours for a 70B model)
    return out
