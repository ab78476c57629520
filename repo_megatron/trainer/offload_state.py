"""What the trainer holds on its GPU between steps, storage by storage, and the interface of the
strategies that take it off the GPU while a colocated SGLang server generates.

Trainer state, by kind:

- ``weights``: the model chunks' parameters and module buffers; with the distributed optimizer
  the parameters are views of Megatron DDP's ``param_data`` buffer of each chunk;
- ``gradients``: DDP's ``grad_data`` buffers (``param.main_grad`` and the main params'
  ``.grad`` are views of them);
- ``main_params``: the optimizer's fp32 main weights under bf16/fp16 (the distributed
  optimizer's ``shard_fp32_from_float16_groups``, the plain one's ``fp32_from_float16_groups``:
  the inner torch optimizer's ``param_groups``), of every optimizer of a ``ChainedOptimizer``;
- ``optimizer_state``: Adam's ``exp_avg`` / ``exp_avg_sq`` (the inner optimizer's ``state``);
- ``reference``: the frozen reference model's parameters and buffers (KL), if there is one.

Tensor subclasses are skipped: Transformer Engine's FP8 weights (``fp8_param_gather``) keep
their bytes in DDP's ``param_data`` buffer of their dtype, which is collected as a buffer.

Collected per storage, not per tensor: views (a parameter inside ``param_data``, a bucket's
slice, a ``main_grad``) share their buffer's storage, which is copied and freed once; they stay
valid tensor objects while it is empty and see the same bytes when it is back, because
``resize_`` keeps the storage object. Only storages on this rank's device count: host tensors
(torch Adam's ``step`` counter) stay where they are.

Gradients are freed, not copied: nothing reads them between one step's optimizer update and the
next step's ``zero_grad_buffer`` (Megatron-Core's own ``offload_grad_buffers`` and verl drop
them too), so they come back zeroed. Copying them would cost 4 bytes per parameter of host
memory and of PCIe traffic each way (a fifth of the state of a bf16 model at DP 1).

Not trainer state, and not freed: the CUDA context and NCCL's buffers, small tensors of the
optimizer (its overflow flag, fp16's loss scale), caches some modules keep as plain attributes
(RoPE frequencies) or Transformer Engine keeps (FP8 transposes). :func:`device_bytes_held`
measures what is left on the device after an offload. Megatron's global memory buffer (scratch
for sequence-parallel all-gathers) is dropped at each offload and re-made by its next use.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch

from ..runtime import cpu_compat

WEIGHTS, GRADIENTS, MAIN_PARAMS, OPTIMIZER_STATE, REFERENCE = (
    "weights", "gradients", "main_params", "optimizer_state", "reference")
KINDS = (WEIGHTS, GRADIENTS, MAIN_PARAMS, OPTIMIZER_STATE, REFERENCE)
_PLAIN = (torch.Tensor, torch.nn.Parameter)


@dataclass(frozen=True)
class StateStorage:
    """One storage of trainer state on the device: ``nbytes`` while it is resident."""
    storage: torch.UntypedStorage
    nbytes: int
    kind: str

    @property
    def keep(self) -> bool:
        """Whether its bytes must come back (everything but gradients)."""
        return self.kind != GRADIENTS


def storage_bytes(storage: torch.UntypedStorage) -> torch.Tensor:
    """The whole storage as a flat uint8 tensor (a view: writes land in the storage)."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(
        storage, 0, (storage.nbytes(),), (1,))


def trainer_state(model: Iterable, optimizer, reference: Iterable = ()) -> list[StateStorage]:
    """Every device storage of the trainer's state (module docstring), each once, in a fixed
    order (the same model and optimizer give the same list). ``model``: the DDP-wrapped chunks
    (``PolicyTrainer.model``); ``optimizer``: Megatron's optimizer (chained or not);
    ``reference``: the reference model's chunks."""
    from megatron.core.distributed import DistributedDataParallel

    found: dict[int, StateStorage] = {}
    here = cpu_compat.device()

    def add(t: Optional[torch.Tensor], kind: str) -> None:
        if t is None or type(t) not in _PLAIN or t.device != here:
            return
        storage = t.untyped_storage()
        if storage.nbytes() == 0:
            return
        seen = found.get(storage._cdata)
        if seen is not None and (seen.keep or kind == GRADIENTS):
            return
        if not storage.resizable():
            raise RuntimeError(f"trainer offload: a {kind} tensor {list(t.shape)} has a storage "
                               "that cannot be resized, so it cannot be freed in place")
        found[storage._cdata] = StateStorage(storage, storage.nbytes(), kind)

    for chunk in model:
        if isinstance(chunk, DistributedDataParallel):   # dense and expert buffers, per dtype
            for buffer in chunk.buffers + chunk.expert_parallel_buffers:
                add(buffer.param_data, WEIGHTS)      # FP8 weights' bytes are only here
                add(buffer.grad_data, GRADIENTS)
        for p in chunk.parameters():
            add(p, WEIGHTS)
            add(getattr(p, "main_grad", None), GRADIENTS)
            add(p.grad, GRADIENTS)
        for b in torch.nn.Module.buffers(chunk):   # DDP's own .buffers is its list of buffers
            add(b, WEIGHTS)
    for wrapper in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(wrapper, "optimizer", None)   # None: this rank has nothing to update
        if inner is None:
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                add(p, MAIN_PARAMS)
                add(p.grad, GRADIENTS)
        for state in inner.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    add(value, OPTIMIZER_STATE)
    for chunk in reference:
        for t in (*chunk.parameters(), *chunk.buffers()):
            add(t, REFERENCE)
    return list(found.values())


def drop_workspace() -> int:
    """Drop Megatron's global memory buffer (scratch, re-made at its next use); returns the
    device bytes it held."""
    from megatron.core import parallel_state

    buffer = parallel_state.get_global_memory_buffer()
    here = cpu_compat.device()
    held = sum(t.untyped_storage().nbytes() for t in buffer.buffer.values() if t.device == here)
    buffer.buffer.clear()
    return held


@dataclass
class OffloadReport:
    """What one offload took off the device."""
    state_bytes: int        # trainer state on the device before the offload
    freed_bytes: int        # of it, freed on the device
    copied_bytes: int       # of it, kept on the host (everything but gradients)
    workspace_bytes: int    # Megatron's global memory buffer, dropped (not state)
    seconds: float
    by_kind: dict = field(default_factory=dict)  # kind -> state bytes

    @property
    def freed_fraction(self) -> float:
        return self.freed_bytes / self.state_bytes if self.state_bytes else 1.0

    def metrics(self) -> dict[str, float]:
        """The report as metrics for the run's log."""
        return {"offload/state_gib": self.state_bytes / 2**30,
                "offload/freed_fraction": self.freed_fraction,
                "offload/seconds": self.seconds}


class TrainerOffload:
    """Takes the trainer's state off its device (:meth:`offload`) and brings it back bit for
    bit (:meth:`restore`; gradients come back zeroed). Both are idempotent: an offload while
    offloaded, or a restore while resident, does nothing. Between the two nothing may read the
    state: a forward, a checkpoint save, a weight sync all need :meth:`restore` first.

    A strategy implements ``_release(state) -> freed bytes`` and ``_reacquire(state)``. The
    state is collected afresh at each offload, so tensors the trainer replaced since the last
    one (a checkpoint load makes new Adam state) are the ones moved."""

    name = ""

    def __init__(self, model: Iterable, optimizer, reference: Optional[Iterable] = None):
        self.model, self.optimizer = list(model), optimizer
        self.reference = list(reference or ())
        self._offloaded: Optional[list[StateStorage]] = None
        self.last_report: Optional[OffloadReport] = None

    @property
    def offloaded(self) -> bool:
        return self._offloaded is not None

    def state(self) -> list[StateStorage]:
        """The trainer state now (:func:`trainer_state`)."""
        return trainer_state(self.model, self.optimizer, self.reference)

    def offload(self) -> OffloadReport:
        """Free the trainer's device memory (after the weight sync, before the rollout)."""
        if self._offloaded is not None:
            return self.last_report
        start = time.perf_counter()
        cpu_compat.synchronize()    # the last step's kernels and the weight sync's copies
        state = self.state()
        freed = self._release(state)
        workspace = drop_workspace()
        cpu_compat.empty_cache()
        cpu_compat.synchronize()
        self._offloaded = state
        by_kind = {k: sum(s.nbytes for s in state if s.kind == k) for k in KINDS}
        self.last_report = OffloadReport(
            state_bytes=sum(by_kind.values()), freed_bytes=freed,
            copied_bytes=sum(s.nbytes for s in state if s.keep), workspace_bytes=workspace,
            seconds=time.perf_counter() - start, by_kind=by_kind)
        return self.last_report

    def restore(self) -> float:
        """Bring the state back onto the device (before the next forward); returns seconds."""
        if self._offloaded is None:
            return 0.0
        start = time.perf_counter()
        self._reacquire(self._offloaded)
        cpu_compat.synchronize()
        self._offloaded = None
        return time.perf_counter() - start

    def _release(self, state: list[StateStorage]) -> int:
        raise NotImplementedError

    def _reacquire(self, state: list[StateStorage]) -> None:
        raise NotImplementedError


def device_bytes_held() -> int:
    """Device memory this process's tensors hold now: torch's allocator on a GPU (storages
    paused by torch_memory_saver still count there: see :func:`cpu_compat.device_free_bytes`);
    in device-faithful mode on a CPU, the device storages reachable from Python objects (a
    tensor only C++ holds, as autograd's saved tensors, is missed); 0 otherwise."""
    if cpu_compat.has_gpu():
        return cpu_compat.memory_allocated()
    if not cpu_compat.device_faithful():
        return 0
    from ..runtime.device_faithful import DEVICE

    gc.collect()        # garbage still in reference cycles is not held
    storages = {}
    for obj in gc.get_objects():
        if type(obj) in _PLAIN and obj in DEVICE:
            storage = obj.untyped_storage()
            storages[storage._cdata] = storage.nbytes()
    return sum(storages.values())
