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
_TARGET: "torch.device | None" = None  # set by cuda_redirected_to


def has_gpu() -> bool:
    """Whether this process can use a CUDA GPU."""
    return torch.cuda.is_available()


def device() -> torch.device:
    """The device this rank computes on: its GPU, or the CPU (or the device of
    :func:`cuda_redirected_to` inside it)."""
    if _TARGET is not None:
        return _TARGET
    return torch.device("cuda", torch.cuda.current_device()) if has_gpu() else torch.device("cpu")


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


def max_memory_allocated() -> int:
    """Peak GPU memory of this process in bytes (0 on CPU)."""
    return torch.cuda.max_memory_allocated() if has_gpu() else 0


def _is_cuda(dev: Any) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return False


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


class _CompletedStream:
    """The CPU's stand-in for a CUDA stream: all work on it has completed already."""

    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def synchronize(self) -> None:
        pass


def enable() -> bool:
    """Install the CPU compatibility layer if there is no GPU. Idempotent; returns whether
    it is active."""
    global _MODE
    if has_gpu():
        return False
    if _MODE is not None:
        return True
    _patch_cuda(_CPU)
    _MODE = CudaToCpuMode()
    _MODE.__enter__()
    log.info("No GPU: Megatron-Core runs on CPU (gloo) through repo_megatron.runtime.cpu_compat")
    return True


_PATCHED = ("current_device", "synchronize", "current_stream", "get_rng_state")


def _patch_cuda(target: torch.device) -> dict:
    """Point ``torch.cuda``'s device queries at ``target``; returns what was there."""
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
