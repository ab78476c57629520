"""Device-faithful mode: on a CPU, know which tensors a GPU run would hold on the GPU, and raise
where CUDA or NCCL would.

On a CPU machine every tensor lives on the host, so a whole class of GPU-only defect (a host
tensor meeting a device tensor, a host tensor handed to an NCCL collective) cannot fail a test.
In this mode each tensor is *device* or *host*, by its storage:

- device: whatever is created on :func:`repo_megatron.runtime.cpu_compat.device` (which then
  names the first GPU) or moved there (``.to(device)``, and megatron-core's own GPU placement
  requests, which cpu_compat redirects), and everything computed from a device tensor
  (autograd's backward too);
- host: everything else (the batch as :mod:`repo_megatron.run.batch` builds it, metrics,
  control-plane messages), and every ``.cpu()`` / ``.to("cpu")`` copy of a device tensor.

Values stay real (the run computes exactly what it computes without the mode); a device tensor
reports the GPU as its device to Python code, so code that branches on placement takes its GPU
branch. The rules, CUDA's and NCCL's own:

1. An op may not mix a device tensor with a host tensor that has dimensions (a 0-dim host
   tensor is a scalar, which CUDA admits). As on CUDA, ``copy_`` crosses devices, and indexing
   takes host index tensors.
2. A collective on a data-plane group (every group not created with ``backend="gloo"``: NCCL
   in a GPU run) takes device tensors only; ``get_backend`` answers ``nccl`` for them.
3. A collective on a gloo group (the control plane) takes host tensors only.
Rules 2 and 3 judge the calls made from outside torch (our code, megatron-core): torch's own
object collectives (``broadcast_object_list`` ...) and checkpoint planners place their tensors
for the real backend, and torch's internals see the real backend.

A breach raises :class:`DevicePlacementError` naming the op, the tensors and the call site.
:func:`repo_megatron.runtime.cpu_compat.enable` installs the mode with ``device_faithful=True``
(the trainer's device-faithful tests and ``repo-megatron train --dry-run``); what it does not
catch is listed in ``docs/training.md``.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
import traceback
from typing import Any, Callable, Iterable, Optional

import torch
import torch.distributed as dist
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class DevicePlacementError(RuntimeError):
    """A tensor is where a GPU run could not have it (CUDA or NCCL would raise here)."""


_PLAIN = (torch.Tensor, torch.nn.Parameter)


class DeviceStorages:
    """The storages that a GPU run would hold on the GPU. Keyed by the storage itself (views
    share it), through weak references: a freed storage leaves the set."""

    def __init__(self):
        self._refs: dict[int, StorageWeakRef] = {}
        self._added = 0

    @staticmethod
    def _storage(t: torch.Tensor):
        if type(t) not in _PLAIN:    # subclasses (torch's ShardedTensor ...) wrap plain tensors
            return None
        try:
            return t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse or other storage-less tensors
            return None

    def add(self, t: torch.Tensor) -> None:
        storage = self._storage(t)
        if storage is None:
            return
        self._refs[storage._cdata] = StorageWeakRef(storage)
        self._added += 1
        if self._added % 4096 == 0:           # forget freed storages now and then
            self._refs = {k: r for k, r in self._refs.items() if not r.expired()}

    def discard(self, t: torch.Tensor) -> None:
        storage = self._storage(t)
        if storage is not None:
            self._refs.pop(storage._cdata, None)

    def __contains__(self, t: torch.Tensor) -> bool:
        storage = self._storage(t)
        if storage is None:
            return False
        # The weak reference keeps a freed storage's address from being reused while we hold
        # it, so an unexpired entry is this very storage.
        ref = self._refs.get(storage._cdata)
        return ref is not None and not ref.expired()


DEVICE = DeviceStorages()

_OWN_FILES = (os.path.abspath(__file__).removesuffix("c"),
              os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_compat.py"))


def call_site() -> str:
    """Where the offending call was made: the innermost frame outside torch and this mode,
    and, when that is a library's (megatron-core), the innermost repo_megatron frame that
    called it."""
    frames = [f for f in traceback.extract_stack()[:-1]
              if os.path.abspath(f.filename) not in _OWN_FILES]
    outside = [f for f in frames if f"{os.sep}torch{os.sep}" not in f.filename]
    ours = [f for f in frames if f"{os.sep}repo_megatron{os.sep}" in f.filename
            and os.path.abspath(f.filename) not in _OWN_FILES]

    def where(f) -> str:
        path = f.filename
        for marker in (f"{os.sep}repo_megatron{os.sep}", f"{os.sep}megatron{os.sep}",
                       f"{os.sep}torch{os.sep}"):
            if marker in path:
                path = marker.strip(os.sep) + os.sep + path.split(marker, 1)[1]
                break
        return f"{path}:{f.lineno} in {f.name}"

    if not outside:
        return "an unknown call site"
    site = where(outside[-1])
    if ours and "site-packages" in outside[-1].filename:   # megatron-core, from our code
        site += f", called from {where(ours[-1])}"
    return site


def describe(t: torch.Tensor) -> str:
    place = "device" if t in DEVICE else "host"
    return f"a {place} tensor {list(t.shape)} {str(t.dtype).removeprefix('torch.')}"


# Ops that cross devices on CUDA, and indexing ops whose index tensors may stay on the host.
_CROSS_DEVICE = {"aten::copy_", "aten::_copy_from", "aten::_copy_from_and_resize",
                 "aten::_to_copy", "aten::lift_fresh", "aten::set_"}
_HOST_INDICES = {"aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_",
                 "aten::_unsafe_index", "aten::_unsafe_index_put"}


def _op_name(func) -> str:
    return func._schema.name if hasattr(func, "_schema") else str(func)


class PlacementChecks(TorchDispatchMode):
    """Rule 1 on every aten op (forward and backward), and device-ness carried from inputs to
    the new tensors an op makes."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _op_name(func)
        checked = args
        if name in _HOST_INDICES and len(args) > 1:
            checked = (args[0], *args[2:])
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        device = [t for t in tree_leaves((checked, kwargs))
                  if isinstance(t, torch.Tensor) and t in DEVICE]
        if device and name not in _CROSS_DEVICE:
            host = [t for t in tree_leaves((checked, kwargs))
                    if isinstance(t, torch.Tensor) and t.dim() > 0 and t not in DEVICE]
            if host:
                raise DevicePlacementError(
                    f"device-faithful: {func} mixes {describe(device[0])} with "
                    f"{describe(host[0])} at {call_site()}; CUDA raises 'Expected all tensors "
                    f"to be on the same device' here")
        out = func(*args, **kwargs)
        if any(t in DEVICE for t in inputs):
            given = {s._cdata for s in map(DeviceStorages._storage, inputs) if s is not None}
            for o in tree_leaves(out):
                if isinstance(o, torch.Tensor):
                    storage = DeviceStorages._storage(o)
                    # in-place and out= results keep what they were (copy_ into a host tensor)
                    if storage is not None and storage._cdata not in given:
                        DEVICE.add(o)
        return out


# ---- collectives ---------------------------------------------------------------------------

_GLOO_GROUPS: dict[int, Any] = {}   # id -> group: created with backend="gloo" (control plane)

# Collectives that move tensors, checked by rules 2 and 3.
TENSOR_COLLECTIVES = (
    "all_reduce", "broadcast", "reduce", "all_gather", "all_gather_into_tensor",
    "all_gather_single", "_all_gather_base", "reduce_scatter", "reduce_scatter_tensor",
    "_reduce_scatter_base", "gather", "scatter", "send", "recv", "isend", "irecv",
    "all_to_all", "all_to_all_single", "all_reduce_coalesced", "batch_isend_irecv")


_TORCH_DISPATCH = os.path.join("torch", "overrides.py")


def _called_from_torch() -> bool:
    """Whether the code that called the wrapper calling this is torch's own (the frames of
    this mode, cpu_compat's function mode and torch's function-mode dispatch skipped)."""
    frame = sys._getframe(2)
    while frame is not None and (os.path.abspath(frame.f_code.co_filename) in _OWN_FILES
                                 or frame.f_code.co_filename.endswith(_TORCH_DISPATCH)):
        frame = frame.f_back
    return frame is not None and frame.f_globals.get("__name__", "").startswith("torch.")


def is_control_group(group) -> bool:
    """Whether ``group`` is a gloo group in a GPU run (created with ``backend="gloo"``)."""
    return group is not None and id(group) in _GLOO_GROUPS


def declare_gloo(group) -> None:
    """Record ``group`` as a gloo (control-plane) group: for groups not made by ``new_group``."""
    if group is not None:
        _GLOO_GROUPS[id(group)] = group


def _tensors_and_groups(fn: Callable, args, kwargs) -> list[tuple[torch.Tensor, Any]]:
    """(tensor, group) of every tensor a collective call moves."""
    if fn.__name__ == "batch_isend_irecv":
        return [(op.tensor, op.group) for op in args[0]]
    bound = inspect.signature(fn).bind(*args, **kwargs)
    group = bound.arguments.get("group")
    tensors = [t for name, value in bound.arguments.items() if name != "group"
               for t in tree_leaves(value) if isinstance(t, torch.Tensor)]
    return [(t, group) for t in tensors]


def _check_collective(fn: Callable, args, kwargs) -> None:
    for tensor, group in _tensors_and_groups(fn, args, kwargs):
        control = is_control_group(group)
        on_device = tensor in DEVICE
        if control and on_device:
            raise DevicePlacementError(
                f"device-faithful: torch.distributed.{fn.__name__} on a gloo (control-plane) "
                f"group gets {describe(tensor)} at {call_site()}; gloo takes host tensors "
                f"(move it with .cpu(), or use a data-plane group)")
        if not control and not on_device:
            raise DevicePlacementError(
                f"device-faithful: torch.distributed.{fn.__name__} on a data-plane group "
                f"(NCCL on a GPU) gets {describe(tensor)} at {call_site()}; NCCL raises 'No "
                f"backend type associated with device type cpu' (move it to "
                f"cpu_compat.device(), or use the gloo control plane)")


def _checked(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def collective(*args, **kwargs):
        if not _called_from_torch():
            _check_collective(fn, args, kwargs)
        return fn(*args, **kwargs)
    collective.__wrapped_by_device_faithful__ = fn
    return collective


def _new_group(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def new_group(*args, **kwargs):
        group = fn(*args, **kwargs)
        backend = inspect.signature(fn).bind(*args, **kwargs).arguments.get("backend")
        if backend is not None and str(backend).lower() == "gloo":
            declare_gloo(group)
        return group
    new_group.__wrapped_by_device_faithful__ = fn
    return new_group


def _get_backend(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def get_backend(group=None):
        real = fn(group)
        if is_control_group(group) or _called_from_torch():
            return real
        return "nccl"                  # every data-plane group is NCCL in a GPU run
    get_backend.__wrapped_by_device_faithful__ = fn
    return get_backend


def _patch(modules: Iterable, name: str, wrap: Callable) -> None:
    """Replace ``name`` in each of ``modules`` by one wrapper of it (one object: torch checks
    ``P2POp``'s function against its own ``isend``/``irecv`` by identity)."""
    wrappers: dict[int, Callable] = {}
    for module in modules:
        fn = getattr(module, name, None)
        if fn is None or hasattr(fn, "__wrapped_by_device_faithful__"):
            continue
        if id(fn) not in wrappers:
            wrappers[id(fn)] = wrap(fn)
        setattr(module, name, wrappers[id(fn)])


_MODE: Optional[PlacementChecks] = None


def install() -> None:
    """Turn the checks on in this process (idempotent). Called by
    :func:`repo_megatron.runtime.cpu_compat.enable` before any process group exists, so that
    every gloo group is known."""
    global _MODE
    if _MODE is not None:
        return
    from torch.distributed import distributed_c10d as c10d

    modules = (dist, c10d)
    for name in TENSOR_COLLECTIVES:
        _patch(modules, name, _checked)
    _patch(modules, "new_group", _new_group)
    _patch(modules, "get_backend", _get_backend)
    _MODE = PlacementChecks()
    _MODE.__enter__()


def installed() -> bool:
    """Whether the device-faithful checks run in this process."""
    return _MODE is not None
