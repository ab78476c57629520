"""Model weights in Megatron dist_checkpointing ``torch_dist`` format.

Checkpoints hold global tensors, so one saved in any TP/PP/VPP layout loads in any other
(resharding happens in ``dist_checkpointing.load``).

Loads are strict, with one exception: ``_extra_state`` objects that only one side has. Which
modules carry one depends on whether Transformer Engine imports where the model is built (with
TE, ``decoder.final_layernorm`` and Qwen3's q/k norms are TE modules with FP8 metadata; without,
they are torch norms with none), not on the weights: a checkpoint converted or trained on one
kind of node must load on the other. See docs/convert.md.
"""

from __future__ import annotations

import logging
import os

import torch

from ..runtime import control
from .plain import weights_only_loads

log = logging.getLogger(__name__)

EXTRA_STATE = "._extra_state"


def sharded_model_state(model: list) -> dict:
    """The sharded state dict of this rank's model chunks (keys ``model0``, ``model1``...)."""
    return {f"model{i}": m.sharded_state_dict() for i, m in enumerate(model)}


def save_model(model: list, directory: str) -> None:
    """Collectively save the model chunks of every rank into ``directory``."""
    from megatron.core import dist_checkpointing

    if torch.distributed.get_rank() == 0:
        os.makedirs(directory, exist_ok=True)  # dist_checkpointing needs it to exist
    control.barrier()
    dist_checkpointing.save(sharded_model_state(model), directory)


def load_sharded_state(sharded_state: dict, directory: str) -> dict:
    """Collectively ``dist_checkpointing.load`` ``sharded_state`` from ``directory``.

    Any key that the checkpoint and ``sharded_state`` do not share raises megatron-core's
    CheckpointingException, except ``_extra_state`` objects: those only in the checkpoint are
    ignored, those only in ``sharded_state`` keep the module's own value (what the module holds
    as built), and one log line names them. Every pickle is read with ``weights_only``."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import (dict_list_map_inplace,
                                                             extract_matching_values, merge)
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.dist_checkpointing.validation import (
        StrictHandling, maybe_report_missing_and_unexpected_keys)

    def is_extra_state(v) -> bool:
        return isinstance(v, ShardedObject) and v.key.endswith(EXTRA_STATE)

    own_extra_state, _ = extract_matching_values(sharded_state, is_extra_state)
    with weights_only_loads():  # model.load may come from elsewhere: no pickled code
        # Megatron's words: "missing" = only in the checkpoint, "unexpected" = only asked for.
        state, ckpt_only, model_only = dist_checkpointing.load(
            sharded_state, directory, strict=StrictHandling.RETURN_ALL)
    # "Unexpected" keys are per rank (a PP stage asks for its own modules): every rank gets
    # all of them, so that all raise or none does, and the log line names every one.
    model_only = set().union(*control.all_gather_object(sorted(model_only)))
    maybe_report_missing_and_unexpected_keys(
        {k for k in ckpt_only if not k.endswith(EXTRA_STATE)},
        {k for k in model_only if not k.endswith(EXTRA_STATE)}, raise_error=True)
    kept, _ = extract_matching_values(own_extra_state, lambda v: v.key in model_only)
    dict_list_map_inplace(lambda v: v.data, kept)
    merge(state, kept)
    if (ckpt_only or model_only) and torch.distributed.get_rank() == 0:
        log.info("%s: _extra_state only in the checkpoint (ignored): %s; only in the model "
                 "(kept as built): %s", directory, sorted(ckpt_only) or "none",
                 sorted(model_only) or "none")
    return state


def load_model(model: list, directory: str) -> None:
    """Collectively load ``directory`` into this rank's model chunks, in any layout
    (:func:`load_sharded_state`)."""
    state = load_sharded_state(sharded_model_state(model), directory)
    for i, m in enumerate(model):
        m.load_state_dict(state[f"model{i}"], strict=True)
