"""Model weights in Megatron dist_checkpointing ``torch_dist`` format.

Checkpoints hold global tensors, so one saved in any TP/PP/VPP layout loads in any other
(resharding happens in ``dist_checkpointing.load``).
"""

from __future__ import annotations

import os

import torch

from .plain import weights_only_loads


def sharded_model_state(model: list) -> dict:
    """The sharded state dict of this rank's model chunks (keys ``model0``, ``model1``...)."""
    return {f"model{i}": m.sharded_state_dict() for i, m in enumerate(model)}


def save_model(model: list, directory: str) -> None:
    """Collectively save the model chunks of every rank into ``directory``."""
    from megatron.core import dist_checkpointing

    if torch.distributed.get_rank() == 0:
        os.makedirs(directory, exist_ok=True)  # dist_checkpointing needs it to exist
    torch.distributed.barrier()
    dist_checkpointing.save(sharded_model_state(model), directory)


def load_model(model: list, directory: str, strict: bool = True) -> None:
    """Collectively load ``directory`` into this rank's model chunks, in any layout."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    with weights_only_loads():  # model.load may come from elsewhere: no pickled code
        state = dist_checkpointing.load(
            sharded_model_state(model), directory,
            strict=StrictHandling.RAISE_ALL if strict else StrictHandling.LOG_ALL)
    for i, m in enumerate(model):
        m.load_state_dict(state[f"model{i}"], strict=True)
