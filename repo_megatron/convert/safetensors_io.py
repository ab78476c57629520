"""Hugging Face safetensors checkpoints: validated headers, byte locations, planned writes.

:class:`SafetensorsCheckpoint` maps tensor names to the shard holding them (``*.index.json``
or a single ``model.safetensors``) and reads every shard's header up front, checking it the way
the safetensors format defines it (header length, JSON, dtypes, shapes, offsets inside the
file), so a truncated or corrupt shard is refused before anything is written. It tells where
each tensor's bytes are (:meth:`~SafetensorsCheckpoint.location`), which lets the converters
copy them without loading them, and reads a tensor when one is needed.

:func:`shard_layout` computes shard headers and every tensor's byte offset from planned names,
dtypes and shapes, so shards are written in place tensor by tensor (:func:`write_safetensors`
for tensors in memory), never assembled in memory.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import shutil
import struct
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from ..errors import ConversionError
from .byte_copy import pread_into, pwrite_all

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# safetensors refuses headers above 100 MB (MAX_HEADER_SIZE in its reader).
MAX_HEADER_BYTES = 100_000_000

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
          "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
          "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorLocation:
    """Where a tensor's bytes are: ``nbytes`` at absolute ``offset`` of ``path``."""
    path: str
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def read_header(path: str) -> dict[str, TensorLocation]:
    """The tensors of one safetensors file, its header checked; a ConversionError naming the file
    says what is wrong (empty, truncated, header too large, not JSON, bad entry)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if size == 0:
                raise ConversionError(f"{path}: file is empty (0 bytes)")
            if len(head) < 8:
                raise ConversionError(f"{path}: truncated ({size} bytes, no safetensors header)")
            (length,) = struct.unpack("<Q", head)
            if length > MAX_HEADER_BYTES:
                raise ConversionError(f"{path}: header length {length} exceeds the format's "
                                      f"{MAX_HEADER_BYTES} bytes (corrupt file?)")
            if 8 + length > size:
                raise ConversionError(f"{path}: truncated (header of {length} bytes, file of "
                                      f"{size})")
            raw = f.read(length)
    except OSError as e:
        raise ConversionError(f"{path}: cannot read ({e.strerror})") from None
    try:
        entries = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(entries, dict):
        raise ConversionError(f"{path}: header is not a JSON object")
    entries.pop("__metadata__", None)
    data_start = 8 + length
    out = {}
    for name, entry in entries.items():
        out[name] = _location(path, name, entry, data_start, size)
    return out


def _location(path: str, name: str, entry, data_start: int, size: int) -> TensorLocation:
    try:
        dtype = DTYPES[entry["dtype"]]
        shape = tuple(entry["shape"])
        begin, end = entry["data_offsets"]
        if not all(isinstance(n, int) and n >= 0 for n in (*shape, begin, end)):
            raise ValueError
    except (KeyError, TypeError, ValueError):
        raise ConversionError(f"{path}: tensor {name} has a malformed header entry "
                              f"{json.dumps(entry)[:200]}") from None
    nbytes = math.prod(shape) * dtype.itemsize
    if end - begin != nbytes:
        raise ConversionError(f"{path}: tensor {name} spans {end - begin} bytes, but shape "
                              f"{list(shape)} {entry['dtype']} needs {nbytes}")
    if data_start + end > size:
        raise ConversionError(f"{path}: truncated (tensor {name} ends at byte {data_start + end}, "
                              f"the file has {size})")
    return TensorLocation(path, data_start + begin, nbytes, dtype, shape)


class SafetensorsCheckpoint:
    """The tensors of a Hugging Face model directory: every shard's header is read and checked
    when this is made; tensor data is read only on :meth:`get`."""

    def __init__(self, directory: str):
        self.directory = directory
        index = os.path.join(directory, INDEX_NAME)
        weight_map = self._weight_map(index) if os.path.exists(index) else None
        if weight_map is not None:
            shards = sorted(set(weight_map.values()))
        elif os.path.exists(os.path.join(directory, SINGLE_NAME)):
            shards = [SINGLE_NAME]
        else:
            raise ConversionError(f"{directory}: no {SINGLE_NAME} or {INDEX_NAME} (only "
                                  "safetensors checkpoints are read)")
        self._tensors: dict[str, TensorLocation] = {}
        for shard in shards:
            path = os.path.join(directory, shard)
            if not os.path.isfile(path):
                raise ConversionError(f"{index}: names shard {shard}, which does not exist")
            for name, location in read_header(path).items():
                if name in self._tensors:
                    raise ConversionError(f"{path}: tensor {name} is also in "
                                          f"{os.path.basename(self._tensors[name].path)}")
                self._tensors[name] = location
        for name, shard in (weight_map or {}).items():
            found = self._tensors.get(name)
            if found is None or os.path.basename(found.path) != shard:
                raise ConversionError(f"{index}: tensor {name} is listed in {shard} but is not in "
                                      "that file")
        self.files = {name: os.path.basename(t.path) for name, t in self._tensors.items()}

    @staticmethod
    def _weight_map(index: str) -> dict[str, str]:
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ConversionError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") \
                from None
        # Shard names are plain file names in the directory (no paths out of it).
        if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and os.path.basename(v) == v
                and v not in ("", ".", "..") for k, v in weight_map.items()):
            raise ConversionError(f"{index}: weight_map must map tensor names to shard file names")
        return weight_map

    def location(self, name: str) -> TensorLocation:
        return self._tensors[name]

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name``, read into its own memory with large sequential reads."""
        t = self._tensors[name]
        out = torch.empty(t.shape, dtype=t.dtype)
        fd = os.open(t.path, os.O_RDONLY)
        try:
            pread_into(fd, byte_view(out), t.offset)
        finally:
            os.close(fd)
        return out


def same_bytes(a: TensorLocation, b: TensorLocation) -> bool:
    """Whether two stored tensors have the same dtype, shape and bytes (read in blocks)."""
    if (a.dtype, a.shape) != (b.dtype, b.shape):
        return False
    block = 16 << 20
    buf_a, buf_b = bytearray(min(block, a.nbytes)), bytearray(min(block, a.nbytes))
    fa, fb = os.open(a.path, os.O_RDONLY), os.open(b.path, os.O_RDONLY)
    try:
        for start in range(0, a.nbytes, block):
            n = min(block, a.nbytes - start)
            pread_into(fa, memoryview(buf_a)[:n], a.offset + start)
            pread_into(fb, memoryview(buf_b)[:n], b.offset + start)
            if memoryview(buf_a)[:n] != memoryview(buf_b)[:n]:
                return False
    finally:
        os.close(fa)
        os.close(fb)
    return True


def byte_view(tensor: torch.Tensor):
    """A writable byte view of a contiguous CPU tensor's memory (through ctypes rather than
    numpy, which does not know bfloat16)."""
    return (ctypes.c_char * tensor.nbytes).from_address(tensor.data_ptr())


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class Shard:
    """One output file: its header and the absolute offset of each of its tensors."""
    file: str
    header: bytes
    offsets: dict[str, int]
    size: int


def shard_layout(tensors: list[PlannedTensor], max_shard_bytes: int) -> list[Shard]:
    """Consecutive tensors grouped into shards of at most ``max_shard_bytes`` (a larger tensor
    gets a shard of its own), named as ``save_pretrained`` names them."""
    groups: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if groups[-1] and size + t.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    names = [SINGLE_NAME] if len(groups) == 1 else [
        f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    shards = []
    for file, group in zip(names, groups):
        entries, offset = {"__metadata__": {"format": "pt"}}, 0
        for t in group:
            entries[t.name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape),
                               "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        raw = json.dumps(entries, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the format aligns the data to 8 bytes
        header = struct.pack("<Q", len(raw)) + raw
        starts = {t.name: len(header) + e["data_offsets"][0]
                  for t, e in zip(group, list(entries.values())[1:])}
        shards.append(Shard(file, header, starts, len(header) + offset))
    return shards


def write_index(directory: str, shards: list[Shard], total_bytes: int) -> None:
    """``model.safetensors.index.json`` for a sharded model (nothing for a single file)."""
    if len(shards) > 1:
        weight_map = {name: s.file for s in shards for name in s.offsets}
        with open(os.path.join(directory, INDEX_NAME), "w") as f:
            json.dump({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, f,
                      indent=2)


def create_shards(directory: str, shards: list[Shard]) -> None:
    """Create each shard file at its full size (a hole to be filled) with its header."""
    for s in shards:
        with open(os.path.join(directory, s.file), "wb") as f:
            f.write(s.header)
            f.truncate(s.size)


def write_safetensors(directory: str, tensors: Iterable[tuple[str, torch.Tensor]],
                      max_shard_bytes: int, planned: Optional[list[PlannedTensor]] = None
                      ) -> list[str]:
    """Write in-memory ``tensors`` as safetensors shards (plus the index for several), each
    tensor at its planned offset; ``planned`` (names, shapes and dtypes in order) is taken from
    ``tensors`` when not given. Returns the file names written."""
    if planned is None:
        tensors = list(tensors)
        planned = [PlannedTensor(n, tuple(t.shape), t.dtype) for n, t in tensors]
    shards = shard_layout(planned, max_shard_bytes)
    where = {name: s for s in shards for name in s.offsets}
    create_shards(directory, shards)
    fds = {s.file: os.open(os.path.join(directory, s.file), os.O_WRONLY) for s in shards}
    try:
        for expected, (name, tensor) in zip(planned, tensors):
            if (name, tuple(tensor.shape), tensor.dtype) != (expected.name, expected.shape,
                                                             expected.dtype):
                raise ValueError(f"{name} {tuple(tensor.shape)} {tensor.dtype} written where "
                                 f"{expected} was planned")
            shard = where[name]
            data = tensor.detach().to("cpu").contiguous()  # held: the byte view does not keep it
            pwrite_all(fds[shard.file], byte_view(data), shard.offsets[name])
    finally:
        for fd in fds.values():
            os.close(fd)
    write_index(directory, shards, sum(t.nbytes for t in planned))
    return [s.file for s in shards]


_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json",
                    ".pt", ".pth", ".gguf", ".msgpack", ".h5")
_JSON_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json")


def copy_model_files(src: str, dst: str, edit_config=None) -> list[str]:
    """Copy a model directory's non-weight files (config.json, generation config, tokenizer
    files, chat template) from ``src`` to ``dst``; returns their names. The JSON files are
    checked to parse (a truncated tokenizer.json is refused, not passed on); ``edit_config``
    (dict -> dict) rewrites config.json on the way."""
    os.makedirs(dst, exist_ok=True)
    copied = []
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if not os.path.isfile(path) or name.endswith(_WEIGHT_SUFFIXES):
            continue
        if name in _JSON_FILES:
            try:
                with open(path, encoding="utf-8") as f:
                    content = json.load(f)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ConversionError(f"{path}: not valid JSON ({e}); truncated?") from None
            if name == "config.json" and edit_config is not None:
                with open(os.path.join(dst, name), "w", encoding="utf-8") as f:
                    json.dump(edit_config(content), f, indent=2, sort_keys=True)
                    f.write("\n")
                copied.append(name)
                continue
        shutil.copyfile(path, os.path.join(dst, name))
        copied.append(name)
    return copied
