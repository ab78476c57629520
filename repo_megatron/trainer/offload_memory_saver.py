"""Trainer offload with torch_memory_saver (``rollout.sglang.offload_trainer: memory_saver``),
the library slime's ``--offload-train`` and SGLang's ``--enable-memory-saver`` use.

torch_memory_saver (TMS) hands out device memory from its own virtual-memory pool: ``pause``
unmaps the physical memory of a tag's allocations (keeping a pinned host copy of those made
with ``enable_cpu_backup``), ``resume`` maps new physical memory at the SAME virtual addresses
and copies the backup in. Device pointers never change, unlike the host path's.

TMS only manages memory allocated inside its ``region()``. slime gets that by starting the whole
trainer process under TMS's ``LD_PRELOAD`` hook (every allocation, NCCL's included, which is why
it tears its process groups down around each pause). Here nothing is needed at model-build time:
at the first offload each state storage (:mod:`.offload_state`) is *moved into* a region in
place (its bytes saved on the device, ``resize_(0)``, ``resize_`` back inside the region, which
allocates from TMS's pool since ``region`` routes this thread's allocations there, bytes copied
back), so the trainer is built, loaded and stepped as usual, Adam's lazily created state
included. Kept kinds go to a tag with CPU backup, gradients to one without (they come back
zeroed, as the host path's). A storage the trainer replaces later (a checkpoint load) is moved
at the next offload. The move costs one device copy of the largest storage, once.

Needs a GPU, ``pip install torch_memory_saver``, and PyTorch's ``expandable_segments`` off
(TMS's pool cannot grow segments). The hook is TMS's in-process ``torch`` mode (a CUDA
pluggable allocator); a process already started under its ``LD_PRELOAD`` hook keeps that mode,
and the tagged pause touches only this trainer's storages either way.
"""

from __future__ import annotations

from ..runtime import cpu_compat
from .offload_state import StateStorage, TrainerOffload, storage_bytes

KEEP_TAG = "repo_megatron.trainer"
GRADIENT_TAG = "repo_megatron.trainer_gradients"


class MemorySaverOffload(TrainerOffload):
    """Storages moved into torch_memory_saver regions once, then paused and resumed by tag."""

    name = "memory_saver"

    def __init__(self, model, optimizer, reference=None):
        super().__init__(model, optimizer, reference)
        from torch_memory_saver import torch_memory_saver

        self.tms = torch_memory_saver
        try:
            self.tms.hook_mode = "torch"    # in-process: no LD_PRELOAD needed
        except (AssertionError, AttributeError):
            pass                            # TMS already started (LD_PRELOAD): keep its mode
        if hasattr(type(self.tms), "retain_cpu_backup"):
            # keep the pinned backup between pauses (newer TMS frees it at each resume, and
            # pinning ~15 GiB again every step would cost seconds)
            self.tms.retain_cpu_backup = True
        self._moved: set[tuple[int, int]] = set()   # (storage, device address) in a region

    def _move_into_regions(self, state: list[StateStorage]) -> None:
        for s in state:
            if (s.storage._cdata, s.storage.data_ptr()) in self._moved:
                continue
            saved = storage_bytes(s.storage).clone() if s.keep else None
            s.storage.resize_(0)
            with self.tms.region(tag=KEEP_TAG if s.keep else GRADIENT_TAG,
                                 enable_cpu_backup=s.keep):
                s.storage.resize_(s.nbytes)
            device = storage_bytes(s.storage)
            if saved is None:
                device.zero_()
            else:
                device.copy_(saved)
                del saved
            self._moved.add((s.storage._cdata, s.storage.data_ptr()))

    @staticmethod
    def _tags(state: list[StateStorage]) -> list[str]:
        return [tag for tag, present in ((KEEP_TAG, any(s.keep for s in state)),
                                         (GRADIENT_TAG, any(not s.keep for s in state)))
                if present]

    def _release(self, state: list[StateStorage]) -> int:
        self._move_into_regions(state)
        cpu_compat.synchronize()
        cpu_compat.empty_cache()    # the blocks the moved storages left in torch's own pool
        for tag in self._tags(state):
            self.tms.pause(tag)
        return sum(s.nbytes for s in state)

    def _reacquire(self, state: list[StateStorage]) -> None:
        for tag in self._tags(state):
            self.tms.resume(tag)
        for s in state:
            if not s.keep:
                storage_bytes(s.storage).zero_()
