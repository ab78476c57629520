"""Every random generator a rank draws from, as plain data (loadable with ``weights_only``).

Python's ``random``, torch's CPU generator, the CUDA generators of this process (when it has
a GPU) and Megatron's RNG tracker: the named CUDA states that tensor-parallel regions fork
(dropout, initialisation), the same states Megatron-LM's own checkpoints keep.
"""

from __future__ import annotations

import random

import torch

from ..runtime import cpu_compat


def _tracker():
    from megatron.core import tensor_parallel
    return tensor_parallel.get_cuda_rng_tracker()


def rng_state() -> dict:
    """This rank's generator states."""
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "gpu": cpu_compat.cuda_rng_states(), "megatron_tracker": _tracker().get_states()}


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned (CUDA states only on a GPU)."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    cpu_compat.set_cuda_rng_states(state.get("gpu"))
    if state.get("megatron_tracker"):  # empty on CPU, where Megatron's tracker is a no-op
        _tracker().set_states(state["megatron_tracker"])
