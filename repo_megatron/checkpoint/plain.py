"""Trainer state as plain data, loaded without unpickling code.

A checkpoint holds pickles (torch's format): loading one with ``weights_only=False`` runs
whatever it names, so a planted checkpoint runs code on ``--resume``. Everything this package
writes is plain data -- tensors, numbers, strings, ``None`` and lists, tuples and dicts of
them -- which ``torch.load(weights_only=True)`` reads and nothing else. :func:`check_plain`
refuses anything else at save time, so a state that could not be read back fails when it is
written, naming its key.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import torch

_SCALARS = (type(None), bool, int, float, str, bytes)


def check_plain(obj: Any, where: str = "trainer_state") -> None:
    """Raise TypeError naming the first value under ``obj`` that is not plain data."""
    if isinstance(obj, _SCALARS) or isinstance(obj, torch.Tensor):
        return
    if isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            check_plain(item, f"{where}[{i}]")
        return
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where}: key {key!r} is a {type(key).__name__}, not str or int")
            check_plain(value, f"{where}.{key}")
        return
    raise TypeError(f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}: checkpoints "
                    "hold plain data only (tensors, numbers, strings, lists, dicts), so that "
                    "they load with torch.load(weights_only=True)")


def load_plain(path: str) -> Any:
    """``torch.load`` of a file written from plain data; refuses any other pickle."""
    return torch.load(path, map_location="cpu", weights_only=True)


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Force ``weights_only=True`` on every ``torch.load`` in the block, including those that
    megatron and ``torch.distributed.checkpoint`` make with ``weights_only=False`` (torch's
    ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` switch, read at each call)."""
    key = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
    before = os.environ.get(key)
    os.environ[key] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before
