"""One rank of a training job of any size, in this process, with tensors that hold no values.

:func:`fake_rank` starts torch's fake process group (``torch.testing._internal.distributed.
fake_pg``: any rank of any world size, collectives return at once and leave their outputs as
they are) and Megatron's TP / PP / DP groups as one rank of that world sees them. Megatron's
gloo side groups become fake groups too (a gloo group needs a real store).

:class:`MetaValues` stands in for the values the ``meta`` device does not have, so that
Megatron's training step runs to its end on it:

- ``.item()`` / ``bool()`` / ``float()`` of a meta tensor (``aten._local_scalar_dense``) answer
  False or 0, what a healthy step answers: no token flagged by a mask check, no overflow found
  by fp16's loss scaler (which would skip the optimizer step), a finite loss and gradient norm
  (small tensors made from Python numbers without a device stay on the CPU and keep theirs);
- ``nonzero()`` of a meta tensor answers every position: the most rows a mask can select
  (the vocab-parallel log-probs take the masked rows of the logits);
- ``torch.tensor()`` of a list of meta scalars (Megatron's CPU fallback of the fused L2 norm
  of the gradients) stacks them: torch would read their values below the dispatcher;
- Megatron's coalesced collectives (the distributed optimizer's gradient reduce-scatter and
  parameter all-gather), for which torch registers no meta kernel, complete at once like the
  fake group's other collectives.

Nothing here knows about memory; :mod:`.tracker` counts it.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..config.parallel import ParallelConfig

_META = torch.device("meta")


def _coalesced_collectives() -> set:
    c10d = torch.ops.c10d
    return {c10d.reduce_scatter_tensor_coalesced_.default,
            c10d.allgather_into_tensor_coalesced_.default,
            c10d.allreduce_coalesced_.default}


def _stack(data):
    return data if isinstance(data, torch.Tensor) else torch.stack([_stack(d) for d in data])


class _StackMetaScalars(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.tensor and args and isinstance(args[0], (list, tuple)):
            leaves = tree_leaves(args[0])
            if leaves and all(isinstance(t, torch.Tensor) and t.device == _META for t in leaves):
                return _stack(args[0]).to(**kwargs)
        return func(*args, **kwargs)


class MetaValues(TorchDispatchMode):
    """The stand-ins for values listed in the module docstring (a dispatch mode, with a
    function mode for ``torch.tensor``)."""

    def __init__(self):
        super().__init__()
        self.coalesced = _coalesced_collectives()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        first = args[0] if args else None
        on_meta = isinstance(first, torch.Tensor) and first.device == _META
        if func is torch.ops.aten._local_scalar_dense.default and on_meta:
            return False if first.dtype == torch.bool else (
                0.0 if first.is_floating_point() else 0)
        if func is torch.ops.aten.nonzero.default and on_meta:
            return torch.empty((first.numel(), first.dim()), dtype=torch.long, device=_META)
        if func in self.coalesced:
            from torch.distributed._meta_registrations import create_fakework

            return create_fakework(args, return_first_arg=False)
        return func(*args, **kwargs)

    def __enter__(self):
        self._stack = _StackMetaScalars()
        self._stack.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        return self._stack.__exit__(*exc)


def global_rank(parallel: ParallelConfig, data_parallel: int, pipeline_rank: int) -> int:
    """The global rank of TP rank 0, DP rank 0 of pipeline stage ``pipeline_rank`` in
    Megatron's default rank order (``tp-cp-ep-dp-pp``: the pipeline dimension outermost)."""
    return pipeline_rank * parallel.tensor_model_parallel_size * data_parallel


@contextmanager
def _gloo_groups_are_fake() -> Iterator[None]:
    new_group = dist.new_group

    def fake_new_group(*args, **kwargs):
        if kwargs.get("backend") == "gloo":
            kwargs["backend"] = "fake"
        return new_group(*args, **kwargs)

    dist.new_group = fake_new_group
    try:
        yield
    finally:
        dist.new_group = new_group


@contextmanager
def fake_rank(parallel: ParallelConfig, data_parallel: int, pipeline_rank: int,
              seed: int = 1234) -> Iterator[int]:
    """Megatron's parallel state of the rank (TP 0, DP 0, ``pipeline_rank``) of a
    ``TP x PP x data_parallel`` job, on the fake process group; yields its global rank and
    tears everything down afterwards. Refuses to run beside a real process group."""
    from megatron.core import parallel_state, tensor_parallel
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers "fake"

    if dist.is_initialized():
        raise RuntimeError("a torch.distributed process group is already running in this "
                           "process; the fake rank needs a process of its own")
    tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
    rank = global_rank(parallel, data_parallel, pipeline_rank)
    dist.init_process_group("fake", store=FakeStore(), rank=rank,
                            world_size=tp * pp * data_parallel)
    try:
        with _gloo_groups_are_fake():
            parallel_state.initialize_model_parallel(
                tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size)
        if parallel_state.get_pipeline_model_parallel_rank() != pipeline_rank:
            raise RuntimeError(f"global rank {rank} is pipeline rank "
                               f"{parallel_state.get_pipeline_model_parallel_rank()}, not "
                               f"{pipeline_rank}: Megatron's rank order changed")
        # Megatron's RNG tracker without generator states: the fake rank draws no numbers.
        tensor_parallel.model_parallel_cuda_manual_seed(seed, inference_rng_tracker=True,
                                                        force_reset_rng=True)
        yield rank
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
