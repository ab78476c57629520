"""Peak memory from the tensors that exist: a dispatch mode that counts live storage bytes.

:class:`StorageTracker` sees the output of every aten operation while it is active (factory
functions included) and counts each new *storage* once, whatever the number of tensors
viewing it, until the storage is freed (a weak-reference finalizer). It works on any device;
with the ``meta`` device a full-size model costs no memory and the counts are exactly the bytes
its storages would take on a GPU, before the caching allocator's rounding (512-byte blocks) and
fragmentation, which it cannot see (nor the CUDA context, NCCL buffers or kernel workspaces).

Every storage carries a *tag*: the phase in which it was made (``forward``, ``logits``,
``optimizer step``...), ``backward`` for those autograd's engine makes, or one given later with
:meth:`StorageTracker.retag` (the weights, gradient buffers and optimizer states are tagged by
walking those objects). The tracker keeps the live bytes per tag, the peak of the total with
the bytes per tag at that moment, the peak reached in each phase, and each tag's largest
amount over the run. Inside :func:`kernel_scratch` nothing is counted: the working memory of
a stand-in for a fused GPU kernel (:mod:`.gpu_layers`).
"""

from __future__ import annotations

import weakref
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

BACKWARD = "backward"
_SCRATCH = [0]  # depth of kernel_scratch blocks


@contextmanager
def kernel_scratch() -> Iterator[None]:
    """Storages made inside are not counted: the working memory of a stand-in for a fused GPU
    kernel, which keeps its temporaries in registers and shared memory. The stand-in makes its
    outputs before and writes them inside; a storage made inside must not outlive the block."""
    _SCRATCH[0] += 1
    try:
        yield
    finally:
        _SCRATCH[0] -= 1


@dataclass
class Peak:
    """The largest total of live bytes, when it happened and what made it up."""
    bytes: int = 0
    phase: str = ""
    by_tag: dict = field(default_factory=dict)


class StorageTracker(TorchDispatchMode):
    """Live bytes of the storages made on ``device`` while active (see the module docstring).

    Storages made on another device (the CPU, by code that names it) are not counted;
    :attr:`largest_elsewhere` records the largest, so that a caller can tell that nothing of
    full size was allocated for real."""

    def __init__(self, device: torch.device = torch.device("meta")):
        super().__init__()
        self.device = torch.device(device)
        self.phase = "start"
        self.live: dict[int, tuple[int, str]] = {}   # storage key -> (bytes, tag)
        self.by_tag: Counter = Counter()
        self.current = 0
        self.peak = Peak()
        self.phase_peaks: dict[str, int] = {}
        self.tag_max: Counter = Counter()
        self.largest_elsewhere = (0, "")              # (bytes, phase)
        self._resize = None

    # ---- phases and tags ----------------------------------------------------------------------
    @contextmanager
    def in_phase(self, name: str) -> Iterator[None]:
        """Tag the storages made in the block with ``name`` and record the block's peak."""
        outer, self.phase = self.phase, name
        self.phase_peaks.setdefault(name, self.current)
        try:
            yield
        finally:
            self.phase = outer

    def retag(self, tensors: Iterable[torch.Tensor], tag: str) -> int:
        """Give the (live, counted) storages of ``tensors`` the tag ``tag``; returns their
        bytes, each storage counted once."""
        moved = 0
        for key in {_key(t) for t in tensors if t is not None}:
            if key not in self.live:
                continue
            nbytes, old = self.live[key]
            self.live[key] = (nbytes, tag)
            self.by_tag[old] -= nbytes
            self.by_tag[tag] += nbytes
            self.tag_max[tag] = max(self.tag_max[tag], self.by_tag[tag])
            moved += nbytes
        return moved

    def track(self, tensors: Iterable[torch.Tensor], tag: str) -> None:
        """Count the storages of ``tensors`` made before the tracker started, as ``tag``."""
        for t in tensors:
            if t.device == self.device and _key(t) not in self.live:
                self._add(t.untyped_storage(), tag)

    def reset_peaks(self) -> None:
        """Forget the peaks so far (the live bytes stay)."""
        self.peak = Peak(self.current, self.phase, dict(self.by_tag))
        self.phase_peaks = {}
        self.tag_max = Counter({tag: n for tag, n in self.by_tag.items() if n})

    # ---- accounting ---------------------------------------------------------------------------
    def _add(self, storage: torch.UntypedStorage, tag: str) -> None:
        key, nbytes = storage._cdata, storage.nbytes()
        self.live[key] = (nbytes, tag)
        weakref.finalize(storage, self._free, key)
        self._count(tag, nbytes)

    def _count(self, tag: str, nbytes: int) -> None:
        self.by_tag[tag] += nbytes
        self.current += nbytes
        if self.by_tag[tag] > self.tag_max[tag]:
            self.tag_max[tag] = self.by_tag[tag]
        if self.current > self.phase_peaks.get(self.phase, -1):
            self.phase_peaks[self.phase] = self.current
        if self.current > self.peak.bytes:
            self.peak = Peak(self.current, self.phase, dict(self.by_tag))

    def _free(self, key: int) -> None:
        nbytes, tag = self.live.pop(key)
        self.by_tag[tag] -= nbytes
        self.current -= nbytes

    def _track(self, tensor: torch.Tensor) -> None:
        if _SCRATCH[0]:
            return
        storage = tensor.untyped_storage()
        if tensor.device != self.device:
            if storage.nbytes() > self.largest_elsewhere[0]:
                self.largest_elsewhere = (storage.nbytes(), self.phase)
            return
        if storage._cdata not in self.live:
            in_backward = torch._C._current_graph_task_id() != -1
            self._add(storage, BACKWARD if in_backward else self.phase)

    def _resized(self, storage: torch.UntypedStorage, size: int) -> None:
        """``UntypedStorage.resize_`` bypasses dispatch (Megatron frees and re-grows buffers
        with it): follow the new size."""
        key = storage._cdata
        self._resize(storage, size)
        if key in self.live:
            nbytes, tag = self.live[key]
            self.live[key] = (storage.nbytes(), tag)
            self.by_tag[tag] -= nbytes
            self.current -= nbytes
            self._count(tag, storage.nbytes())

    def __enter__(self):
        self._resize = torch.UntypedStorage.resize_
        tracker = self
        torch.UntypedStorage.resize_ = lambda storage, size: tracker._resized(storage, size)
        return super().__enter__()

    def __exit__(self, *exc):
        torch.UntypedStorage.resize_ = self._resize
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t)
        return out


def _key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata
