"""Trainer offload in colocated runs: which strategy ``rollout.sglang.offload_trainer`` selects.

In a colocated run (``rollout.sglang.weight_sync: tensor``) SGLang and Megatron take turns on
each GPU. While SGLang generates, the trainer's weights, gradient buffers, fp32 main weights
and Adam state (:mod:`.offload_state`) leave the device; they come back bit for bit (gradients
zeroed) before the next forward:

- ``host`` (:mod:`.offload_host`): copies to a pinned host buffer allocated once, device
  storages freed with ``resize_(0)``; portable, tested on CPU;
- ``memory_saver`` (:mod:`.offload_memory_saver`): torch_memory_saver's pause/resume, device
  addresses kept; needs the package and a GPU;
- ``auto``: ``memory_saver`` where it can work, ``host`` otherwise; ``off``: nothing moves.

Disaggregated runs (any other ``weight_sync``) never offload: their trainer has its GPUs to
itself (the config refuses ``host`` / ``memory_saver`` there).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

from ..errors import ConfigError
from ..runtime import cpu_compat
from .offload_host import HostOffload
from .offload_memory_saver import MemorySaverOffload
from .offload_state import TrainerOffload

KEY = "rollout.sglang.offload_trainer"
STRATEGIES = {"host": HostOffload, "memory_saver": MemorySaverOffload}


def memory_saver_problem() -> Optional[str]:
    """Why torch_memory_saver cannot work in this process (None: it can)."""
    if not cpu_compat.has_gpu():
        return "it needs a CUDA GPU"
    if importlib.util.find_spec("torch_memory_saver") is None:
        return "torch_memory_saver is not installed (pip install torch_memory_saver)"
    if "expandable_segments:true" in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "").lower():
        return ("PYTORCH_CUDA_ALLOC_CONF has expandable_segments:True, which "
                "torch_memory_saver's pool does not support")
    return None


def resolve_offload_mode(mode: str) -> str:
    """``off``, ``host`` or ``memory_saver`` for the configured ``mode`` (the config's
    ``SGLangConfig.trainer_offload``); ConfigError where ``memory_saver`` cannot work."""
    problem = memory_saver_problem() if mode in ("auto", "memory_saver") else None
    if mode == "memory_saver" and problem is not None:
        raise ConfigError(f"{KEY}=memory_saver cannot work here: {problem}; use host "
                          f"(portable) or auto")
    if mode == "auto":
        return "host" if problem is not None else "memory_saver"
    return mode


def build_trainer_offload(mode: str, trainer, reference=None) -> Optional[TrainerOffload]:
    """The offload of ``trainer`` (a :class:`~.train_step.PolicyTrainer`) and of the
    ``reference`` model's chunks for ``mode``; None when it resolves to ``off``."""
    resolved = resolve_offload_mode(mode)
    if resolved == "off":
        return None
    return STRATEGIES[resolved](trainer.model, trainer.optimizer, reference)
