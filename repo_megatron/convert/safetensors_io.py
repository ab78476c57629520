"""Hugging Face safetensors checkpoints, read memory-mapped and written as a stream.

:class:`SafetensorsCheckpoint` maps tensor names to the shard holding them (``*.index.json``
or a single ``model.safetensors``); ``get`` returns a tensor backed by the file's pages, not a
copy. :func:`write_safetensors` writes shards tensor by tensor: the header is computed from
the planned names, dtypes and shapes, so no shard is ever assembled in memory.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from typing import Iterator

import torch
from safetensors import safe_open

from ..config.base import ConfigError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
_NAMES = {v: k for k, v in _DTYPES.items()}


class SafetensorsCheckpoint:
    """The tensors of a Hugging Face model directory, opened lazily (memory-mapped)."""

    def __init__(self, directory: str):
        self.directory = directory
        index = os.path.join(directory, INDEX_NAME)
        if os.path.exists(index):
            with open(index) as f:
                self.files: dict[str, str] = json.load(f)["weight_map"]
        elif os.path.exists(os.path.join(directory, SINGLE_NAME)):
            with safe_open(os.path.join(directory, SINGLE_NAME), framework="pt") as f:
                self.files = {name: SINGLE_NAME for name in f.keys()}
        else:
            raise ConfigError(f"{directory}: no {SINGLE_NAME} or {INDEX_NAME} (only safetensors "
                              "checkpoints are read)")
        self._handles: dict[str, object] = {}

    def _open(self, name: str):
        file = self.files[name]
        if file not in self._handles:
            self._handles[file] = safe_open(os.path.join(self.directory, file), framework="pt")
        return self._handles[file]

    def meta(self, name: str) -> torch.Tensor:
        """A ``meta`` tensor with the shape and dtype of ``name`` (reads no data)."""
        piece = self._open(name).get_slice(name)
        return torch.empty(piece.get_shape(), dtype=_DTYPES[piece.get_dtype()], device="meta")

    def get(self, name: str) -> torch.Tensor:
        return self._open(name).get_tensor(name)


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def shard_plan(tensors: list[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """Consecutive tensors grouped into shards of at most ``max_shard_bytes`` (a larger
    tensor gets a shard of its own)."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _header(shard: list[PlannedTensor]) -> bytes:
    entries, offset = {"__metadata__": {"format": "pt"}}, 0
    for t in shard:
        entries[t.name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape),
                           "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns the data to 8 bytes
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors(directory: str, planned: list[PlannedTensor],
                      tensors: Iterator[tuple[str, torch.Tensor]],
                      max_shard_bytes: int) -> list[str]:
    """Write ``tensors`` (yielded in ``planned`` order) as safetensors shards, plus the index
    when there is more than one shard. Returns the file names written."""
    shards = shard_plan(planned, max_shard_bytes)
    names = [SINGLE_NAME] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for file, shard in zip(names, shards):
        with open(os.path.join(directory, file), "wb") as f:
            f.write(_header(shard))
            for expected in shard:
                name, tensor = next(tensors)
                if name != expected.name or tuple(tensor.shape) != expected.shape \
                        or tensor.dtype != expected.dtype:
                    raise AssertionError(f"{name} {tuple(tensor.shape)} {tensor.dtype} written "
                                         f"where {expected} was planned")
                # Raw bytes of the tensor, without a copy (bf16 has no numpy dtype: view as u8).
                f.write(tensor.contiguous().view(-1).view(torch.uint8).numpy().data)
                weight_map[name] = file
            f.flush()
            os.fsync(f.fileno())
    if len(shards) > 1:
        total = sum(t.nbytes for t in planned)
        with open(os.path.join(directory, INDEX_NAME), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names


_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json",
                    ".pt", ".pth", ".gguf", ".msgpack", ".h5")


def copy_model_files(src: str, dst: str) -> list[str]:
    """Copy a model directory's non-weight files (config.json, generation config, tokenizer
    files, chat template) from ``src`` to ``dst``; returns their names."""
    import shutil

    os.makedirs(dst, exist_ok=True)
    copied = []
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if os.path.isfile(path) and not name.endswith(_WEIGHT_SUFFIXES):
            shutil.copyfile(path, os.path.join(dst, name))
            copied.append(name)
    return copied
