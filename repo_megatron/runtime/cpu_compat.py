"""Megatron-Core on CPU: the one module that names CUDA.

megatron-core (0.16 to 0.19) hard-codes CUDA in a few places that the CPU path goes through
(checked file:line facts in the foundation issue). When CUDA is unavailable, :func:`enable`
makes the genuine Megatron TP/PP/DP code run on CPU with the gloo backend:

- ``torch.cuda.current_device()`` returns the CPU device (rotary embeddings, the global memory
  buffer, all-gather outputs, p2p receive buffers, dist_checkpointing's failure broadcast);
- ``torch.cuda.synchronize()`` is a no-op (p2p batching, async checkpoint writer);
- ``torch.cuda.current_stream()`` returns a stream whose ``wait_event`` / ``wait_stream`` /
  ``synchronize`` do nothing: megatron-core 0.19 asks for it unconditionally in
  ``param_and_grad_buffer.start_grad_sync`` (to wait for CUDA-graph events CPU runs never
  record); on CPU every operation is already complete when it returns;
- ``torch.cuda.get_rng_state()`` returns an empty state: activation recomputation
  (``recompute_granularity``) saves the CUDA RNG state around each checkpointed region, and
  a CPU process has no CUDA generator (the CPU generator is saved and restored as usual;
  restoring the CUDA state is queued by torch until CUDA initialises, which never happens);
- a :class:`~torch.overrides.TorchFunctionMode` maps ``device="cuda"`` factory arguments and
  ``Tensor.cuda()`` to the CPU (pipeline schedules' token counters, tied-embedding all-reduce
  under PP), and reports CPU float tensors as ``torch.cuda.*Tensor`` to the two type checks
  in gradient clipping and the distributed optimizer.

With ``enable(device_faithful=True)`` the CPU also behaves like a GPU where placement matters
(:mod:`.device_faithful`): :func:`device` answers ``cuda:0``, what is created there or moved
there is a *device* tensor that reports ``cuda:0`` (``.device``, ``.is_cuda``, ``.type()``),
``.cpu()`` of it is a host copy and ``.numpy()`` of it raises, as on a GPU; mixing it with host
tensors, or handing it to the wrong collective, raises.

Nothing here runs when a GPU is present, and no other module of repo_megatron names CUDA:
device placement elsewhere goes through :func:`device` / :func:`has_gpu`.

:func:`cuda_redirected_to` does the same for a block of code and any device, GPU or not: with
the ``meta`` device it builds and trains a full-size rank whose tensors have shapes but no
memory (the memory measurement of ``repo-megatron plan --measure``).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

_MODE: "CudaToCpuMode | None" = None
_GPU = torch.device("cuda", 0)   # where device tensors say they are in device-faithful mode
_TARGET: "torch.device | None" = None  # set by cuda_redirected_to


def has_gpu() -> bool:
    """Whether this process can use a CUDA GPU."""
    return torch.cuda.is_available()


def device() -> torch.device:
    """The device this rank computes on: its GPU, or the CPU (``cuda:0`` in device-faithful
    mode, which places such tensors on the CPU and tracks them as device tensors; the device
    of :func:`cuda_redirected_to` inside it)."""
    if _TARGET is not None:
        return _TARGET
    if has_gpu():
        return torch.device("cuda", torch.cuda.current_device())
    return _GPU if device_faithful() else torch.device("cpu")


def set_device(local_rank: int) -> None:
    """Bind this process to its local GPU (no-op on CPU)."""
    if has_gpu():
        torch.cuda.set_device(local_rank)


def synchronize() -> None:
    """Wait for queued GPU work (no-op on CPU)."""
    if has_gpu():
        torch.cuda.synchronize()


def cuda_rng_states() -> "list[torch.Tensor] | None":
    """The CUDA generator states of every visible GPU (None on CPU)."""
    return torch.cuda.get_rng_state_all() if has_gpu() else None


def set_cuda_rng_states(states: "list[torch.Tensor] | None") -> None:
    """Restore :func:`cuda_rng_states` (no-op on CPU or when there are none)."""
    if states is not None and has_gpu():
        torch.cuda.set_rng_state_all(states)


@contextmanager
def device_scope(dev: torch.device) -> Iterator[None]:
    """Make ``dev`` the current GPU of this thread for the block. torch's current device is
    per thread: a worker thread (an event loop, ``asyncio.to_thread``) starts on GPU 0
    whatever :func:`set_device` chose for the rank, so work handed to a thread runs under the
    device its caller captured with :func:`device`. No-op for a CPU (or meta) device, and
    without a GPU (device-faithful mode names one)."""
    if dev.type != "cuda" or not has_gpu():
        yield
        return
    with torch.cuda.device(dev):
        yield


def memory_allocated() -> int:
    """GPU memory this process's tensors hold now, in bytes (0 on CPU)."""
    return torch.cuda.memory_allocated() if has_gpu() else 0


def max_memory_allocated() -> int:
    """Peak GPU memory of this process in bytes since the last :func:`reset_peak_memory`
    (0 on CPU)."""
    return torch.cuda.max_memory_allocated() if has_gpu() else 0


def reset_peak_memory() -> None:
    """Start a new peak for :func:`max_memory_allocated` (no-op on CPU)."""
    if has_gpu():
        torch.cuda.reset_peak_memory_stats()


def pinned_host_bytes(nbytes: int) -> torch.Tensor:
    """``nbytes`` of host memory (uint8) for copies to and from this rank's GPU: page-locked
    when there is a GPU (so ``non_blocking`` copies are asynchronous DMA at full PCIe speed),
    plain memory otherwise."""
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=has_gpu())


def empty_cache() -> None:
    """Give the caching allocator's free blocks back to the driver (no-op on CPU): memory a
    process frees is usable by another process on the same GPU (a colocated SGLang server)
    only then."""
    if has_gpu():
        torch.cuda.empty_cache()


def device_free_bytes() -> "int | None":
    """Free memory of this rank's GPU as the driver sees it, all processes counted (None on
    CPU): what torch_memory_saver's pause frees shows here, not in :func:`memory_allocated`."""
    return torch.cuda.mem_get_info()[0] if has_gpu() else None


def gpu_description() -> "dict | None":
    """Name, compute capability and memory of this rank's GPU (None on CPU)."""
    if not has_gpu():
        return None
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {"name": props.name, "capability": [props.major, props.minor],
            "memory_bytes": props.total_memory, "cuda": torch.version.cuda}


def _is_cuda(dev: Any) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return isinstance(dev, int) and not isinstance(dev, bool)  # an ordinal: a CUDA device


_CPU = torch.device("cpu")
_CUDA_TYPE_NAMES = {f"torch.{prefix}{kind}": f"torch.cuda.{kind}"
                    for prefix in ("", "meta.")
                    for kind in ("FloatTensor", "HalfTensor", "BFloat16Tensor")}


class CudaToCpuMode(TorchFunctionMode):
    """Redirect CUDA placement requests made by megatron-core to ``target`` (the CPU, or the
    device of :func:`cuda_redirected_to`)."""

    def __init__(self, target: torch.device = _CPU):
        super().__init__()
        self.target = target

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0].to(self.target)
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name)
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs = {**kwargs, "device": self.target}
        elif func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], self.target, *args[2:])
        return func(*args, **kwargs)


_DEVICE_GET = torch.Tensor.device.__get__
_IS_CUDA_GET = torch.Tensor.is_cuda.__get__
_IS_CPU_GET = torch.Tensor.is_cpu.__get__


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage()._cdata == b.untyped_storage()._cdata


class DeviceFaithfulMode(CudaToCpuMode):
    """:class:`CudaToCpuMode` that also keeps track of device tensors (:mod:`.device_faithful`)
    and answers placement questions about them as a GPU run would."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        from .device_faithful import DEVICE, DevicePlacementError, describe

        kwargs = kwargs or {}
        if func == _DEVICE_GET:
            return _GPU if args[0] in DEVICE else func(*args)
        if func == _IS_CUDA_GET:
            return args[0] in DEVICE
        if func == _IS_CPU_GET:
            return args[0] not in DEVICE
        if func is torch.Tensor.get_device:
            return 0 if args[0] in DEVICE else -1
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TYPE_NAMES.get(name, name) if args[0] in DEVICE else name
        if func is torch.Tensor.numpy and args[0] in DEVICE:
            raise DevicePlacementError(f"device-faithful: .numpy() of {describe(args[0])}: "
                                       "on a GPU this raises (copy it with .cpu() first)")
        if func is torch.Tensor.cuda:
            return self._to_device(args[0], args[0])
        if func is torch.Tensor.cpu:
            return self._to_host(args[0], args[0].clone() if args[0] in DEVICE else args[0])
        if func is torch._C._nn._parse_to:      # Module.to's argument parsing: keep cuda
            return func(*args, **kwargs)
        if func is torch.Tensor.to:
            target = kwargs.get("device", args[1] if len(args) > 1 else None)
            if isinstance(target, torch.Tensor):          # .to(other): other's placement
                target = _GPU if target in DEVICE else target.device
            if _is_cuda(target):
                args, kwargs = self._redirect(args, kwargs)
                return self._to_device(args[0], func(*args, **kwargs))
            if target is not None and not isinstance(target, torch.dtype):
                return self._to_host(args[0], func(*args, **kwargs))
            return func(*args, **kwargs)
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            out = func(*args, **{**kwargs, "device": _CPU})
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor):
                    DEVICE.add(t)
            return out
        return super().__torch_function__(func, types, args, kwargs)

    @staticmethod
    def _redirect(args, kwargs):
        if "device" in kwargs:
            return args, {**kwargs, "device": _CPU}
        return (args[0], _CPU, *args[2:]), kwargs

    @staticmethod
    def _to_device(source: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``source`` moved to the GPU: a host tensor is copied (as CUDA copies it)."""
        from .device_faithful import DEVICE

        if source not in DEVICE and _same_storage(source, result):
            result = result.clone()
        DEVICE.add(result)
        return result

    @staticmethod
    def _to_host(source: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """``source`` moved to the host: a device tensor is copied, and the copy is host."""
        from .device_faithful import DEVICE

        if source in DEVICE:
            if _same_storage(source, result):
                result = result.clone()
            DEVICE.discard(result)
        return result


class _CompletedStream:
    """The CPU's stand-in for a CUDA stream: all work on it has completed already."""

    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def synchronize(self) -> None:
        pass


def enable(device_faithful: bool = False) -> bool:
    """Install the CPU compatibility layer if there is no GPU. Idempotent; returns whether
    it is active. ``device_faithful``: also the checks of :mod:`.device_faithful` (must be
    asked for by the first call in a process, before any process group exists)."""
    global _MODE
    if has_gpu():
        return False
    if _MODE is not None:
        if device_faithful and not isinstance(_MODE, DeviceFaithfulMode):
            raise RuntimeError("cpu_compat is already enabled without device_faithful: enable "
                               "it device-faithful first, before any process group exists")
        return True
    if device_faithful:
        from . import device_faithful as checks
        checks.install()
    # In device-faithful mode megatron-core's device=torch.cuda.current_device() is the
    # ordinal a GPU run passes; the function mode places it on the CPU as a device tensor.
    _patch_cuda(0 if device_faithful else _CPU)
    _MODE = DeviceFaithfulMode() if device_faithful else CudaToCpuMode()
    _MODE.__enter__()
    log.info("No GPU: Megatron-Core runs on CPU (gloo) through repo_megatron.runtime.cpu_compat%s",
             ", device-faithful" if device_faithful else "")
    return True


def device_faithful() -> bool:
    """Whether this process runs in device-faithful mode."""
    return isinstance(_MODE, DeviceFaithfulMode)


_PATCHED = ("current_device", "synchronize", "current_stream", "get_rng_state")


def _patch_cuda(target: "torch.device | int") -> dict:
    """Point ``torch.cuda``'s device queries at ``target`` (a device, or the ordinal
    device-faithful mode answers); returns what was there."""
    saved = {name: getattr(torch.cuda, name) for name in _PATCHED}
    saved["random.get_rng_state"] = torch.cuda.random.get_rng_state
    torch.cuda.current_device = lambda: target
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.current_stream = lambda device=None: _CompletedStream()
    torch.cuda.get_rng_state = torch.cuda.random.get_rng_state = \
        lambda device="cuda": torch.empty(0, dtype=torch.uint8, device=_CPU)
    return saved


@contextmanager
def cuda_redirected_to(target: torch.device) -> Iterator[None]:
    """Inside the block, every CUDA placement request (``current_device()``, ``device="cuda"``,
    ``.cuda()``, :func:`device`) lands on ``target``, whether a GPU is present or not;
    ``torch.cuda``'s queries are restored afterwards. Tensors made without a device stay on the
    CPU, as they would beside a GPU. With ``torch.device("meta")`` megatron-core builds and
    trains a full-size rank whose tensors have shapes and no memory
    (:mod:`repo_megatron.plan.measure`). Not re-entrant."""
    global _TARGET
    if _TARGET is not None:
        raise RuntimeError(f"CUDA is already redirected to {_TARGET}")
    saved = _patch_cuda(target)
    _TARGET = target
    try:
        with CudaToCpuMode(target):
            yield
    finally:
        _TARGET = None
        torch.cuda.random.get_rng_state = saved.pop("random.get_rng_state")
        for name, value in saved.items():
            setattr(torch.cuda, name, value)


@contextmanager
def suspended() -> Iterator[None]:
    """Run torch without this layer's function mode, for code that never asks for CUDA (the
    embedded rollout engine's transformers model): with the mode on, every torch call goes
    through its Python hook, which made the engine's decode about 12% slower (SmolLM2-135M,
    20 rows). Does nothing when the layer is not installed."""
    if _MODE is None:
        yield
        return
    with torch._C.DisableTorchFunction():
        yield


def active() -> bool:
    """Whether the CPU compatibility layer is installed in this process."""
    return _MODE is not None


def seed_model_parallel(seed: int) -> None:
    """Megatron's model-parallel seeding; on CPU its CUDA RNG tracker is replaced by the
    no-op inference tracker (dropout is off in RL fine-tuning and weights are initialised on
    the CPU generator with ``use_cpu_initialization``)."""
    from megatron.core import tensor_parallel
    tensor_parallel.model_parallel_cuda_manual_seed(
        seed, inference_rng_tracker=not has_gpu(), force_reset_rng=True)
