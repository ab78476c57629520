"""The control plane: small objects and waits between ranks, on a gloo group of their own.

Rank 0 runs the rollout (SGLang, rewards, the RePO stage) while the other trainer ranks wait
for its groups; it also converts checkpoints, launches servers, syncs weights to the engine
and exports, while the others wait. Those waits can last far longer than a collective should:
on the default (NCCL) group a rank sitting in a broadcast for longer than the NCCL timeout is
killed by the watchdog. So, as slime does, everything that waits for rank 0 goes through a
separate gloo group with its own long timeout (``parallel.control_timeout_minutes``); tensors
(the data plane) stay on Megatron's groups.

:func:`initialize` is called by :func:`repo_megatron.runtime.distributed.initialize` on every
rank. The helpers below are the one set every package uses for small objects and waits
(the session, the conversion cache, checkpoints): :func:`broadcast_object`,
:func:`all_gather_object`, :func:`barrier`, and :func:`first_problem`, with which every rank
agrees on whether any rank failed (so that all raise, or none does).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Optional

import torch

_GROUP: Optional[Any] = None


def initialize(timeout: timedelta) -> None:
    """Create the control group (every rank, gloo, ``timeout``). Collective; idempotent."""
    global _GROUP
    if _GROUP is None:
        _GROUP = torch.distributed.new_group(backend="gloo", timeout=timeout)


def initialized() -> bool:
    """Whether :func:`initialize` has run (and :func:`destroy` not since)."""
    return _GROUP is not None


def group():
    """The control group; raises if :func:`initialize` has not run."""
    if _GROUP is None:
        raise RuntimeError("the control plane is not initialised: call "
                           "repo_megatron.runtime.distributed.initialize first")
    return _GROUP


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of global rank ``src`` on every rank (pickled over the control group)."""
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src, group=group())
    return box[0]


def all_gather_object(obj: Any) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    out = [None] * torch.distributed.get_world_size(group())
    torch.distributed.all_gather_object(out, obj, group=group())
    return out


def first_problem(problem: Optional[str]) -> Optional[str]:
    """The problem of the first rank that has one (None on a rank that has none), on every
    rank: what makes every rank raise the same error, or none of them."""
    return next((p for p in all_gather_object(problem) if p is not None), None)


def barrier() -> None:
    """Wait for every rank, on the control group."""
    torch.distributed.barrier(group=group())


def destroy() -> None:
    """Forget the group (it dies with the default process group)."""
    global _GROUP
    _GROUP = None
