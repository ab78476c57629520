"""Hugging Face safetensors checkpoints, read and written tensor by tensor.

:class:`SafetensorsCheckpoint` maps tensor names to the shard holding them (``*.index.json``
or a single ``model.safetensors``) and reads one tensor at a time. :func:`write_safetensors` writes shards tensor by tensor: the header is computed from
the planned names, dtypes and shapes, so no shard is ever assembled in memory.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import struct
from dataclasses import dataclass
from typing import Iterator

import torch
from ..config.base import ConfigError
from .reading import pread_into

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
_NAMES = {v: k for k, v in _DTYPES.items()}


class SafetensorsCheckpoint:
    """The tensors of a Hugging Face model directory, read one at a time.

    Only the shard headers are read up front; :meth:`get` reads one tensor into its own
    buffer with large sequential reads (faster than faulting in a memory map on a cold page
    cache), so memory holds the tensors in use and nothing else."""

    def __init__(self, directory: str):
        self.directory = directory
        index = os.path.join(directory, INDEX_NAME)
        if os.path.exists(index):
            with open(index) as f:
                self.files: dict[str, str] = json.load(f)["weight_map"]
        elif os.path.exists(os.path.join(directory, SINGLE_NAME)):
            self.files = {name: SINGLE_NAME for name in self._header(SINGLE_NAME)[0]}
        else:
            raise ConfigError(f"{directory}: no {SINGLE_NAME} or {INDEX_NAME} (only safetensors "
                              "checkpoints are read)")
        self._headers: dict[str, tuple[dict, int]] = {}

    def _header(self, file: str) -> tuple[dict, int]:
        """(entries, offset of the data section) of one shard."""
        path = os.path.join(self.directory, file)
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            entries = json.loads(f.read(size))
        entries.pop("__metadata__", None)
        return entries, 8 + size

    def _entry(self, name: str) -> tuple[str, dict, int]:
        file = self.files[name]
        if file not in self._headers:
            self._headers[file] = self._header(file)
        entries, data_start = self._headers[file]
        if name not in entries:
            raise ConfigError(f"{self.directory}/{file}: tensor {name} is listed in the index "
                              "but not in the file")
        return file, entries[name], data_start

    def meta(self, name: str) -> torch.Tensor:
        """A ``meta`` tensor with the shape and dtype of ``name`` (reads no data)."""
        _, entry, _ = self._entry(name)
        return torch.empty(entry["shape"], dtype=_DTYPES[entry["dtype"]], device="meta")

    def get(self, name: str) -> torch.Tensor:
        file, entry, data_start = self._entry(name)
        out = torch.empty(entry["shape"], dtype=_DTYPES[entry["dtype"]])
        begin, end = entry["data_offsets"]
        if end - begin != out.nbytes:
            raise ConfigError(f"{self.directory}/{file}: tensor {name} has {end - begin} bytes "
                              f"for shape {entry['shape']} {entry['dtype']}")
        fd = os.open(os.path.join(self.directory, file), os.O_RDONLY)
        try:
            pread_into(fd, _bytes(out), data_start + begin)
        finally:
            os.close(fd)
        return out


def _bytes(tensor: torch.Tensor):
    """A writable byte view of a contiguous CPU tensor's memory (through ctypes rather than
    numpy, which would pin the storage's size: the DCP planner frees storages it wrote)."""
    return (ctypes.c_char * tensor.nbytes).from_address(tensor.data_ptr())


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
                data = tensor.contiguous()  # held: the byte view does not keep it alive
                f.write(_bytes(data))
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
