"""Megatron ``torch_dist`` checkpoints, written and read without a model and without moving
tensor bytes through Python.

A ``torch_dist`` checkpoint is a PyTorch Distributed Checkpoint (DCP) directory of global
tensors stored as chunks (each chunk one ``torch.save`` record inside a ``.distcp`` file),
plus Megatron's ``metadata.json`` and ``common.pt``.

- :func:`write_torch_dist_layout` saves every planned chunk through DCP (its planner, file
  naming and ``.metadata``), each chunk's record written by ``torch.save`` under
  ``torch.serialization.skip_data()``: the files are what DCP writes, with each chunk's data
  left as a hole; it returns where each chunk's bytes go, for the converter to fill in.
- :class:`TorchDistReader` reads ``.metadata`` through an allow-list unpickler (it is a pickle:
  a plain ``pickle.load`` would run whatever a crafted file asks), locates every chunk's bytes
  from its record (``torch.load(map_location="meta", weights_only=True)`` reads only the
  record's small pickle) and checks dtype, shape and bounds; it reads regions into memory for
  layouts that whole-row copies cannot serve.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, _StorageInfo
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, Metadata, MetadataIndex,
                                                   TensorProperties, TensorStorageMetadata)
from torch.distributed.checkpoint.planner import (SavePlan, TensorWriteData, WriteItem,
                                                  WriteItemType)
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from ..errors import ConversionError
from .byte_copy import pread_into
from .row_plan import Segment

# What megatron.core.dist_checkpointing.save writes next to the DCP files.
MEGATRON_METADATA = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                     "common_backend": "torch", "common_backend_version": 1}
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Chunk:
    """One stored piece of a global tensor: ``sizes`` at ``offsets`` of ``global_shape``."""
    key: str
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.sizes) * self.dtype.itemsize


@dataclass(frozen=True)
class ChunkData:
    """Where the bytes of a stored chunk are: ``path`` from ``offset``, C-contiguous."""
    path: str
    offset: int
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    dtype: torch.dtype


def sharded_object_key(key: str, offset: int, count: int) -> str:
    """DCP name Megatron gives the ``ShardedObject`` of layer ``offset`` out of ``count``
    (``0`` of ``1`` for a module outside the layers)."""
    return f"{key}/shard_{offset}_{count}"


class _LayoutPlanner(DefaultSavePlanner):
    """A save plan made from chunk descriptions; every tensor handed to the writer is an
    untouched ``torch.empty`` (no memory is committed: skip_data never reads it)."""

    def __init__(self, chunks: list[Chunk], objects: dict[str, bytes]):
        super().__init__()
        self._chunks = {MetadataIndex(c.key, torch.Size(c.offsets)): c for c in chunks}
        self._objects = objects

    def create_local_plan(self) -> SavePlan:
        items = [WriteItem(index=MetadataIndex(name), type=WriteItemType.BYTE_IO)
                 for name in self._objects]
        items += [WriteItem(index=index, type=WriteItemType.SHARD, tensor_data=TensorWriteData(
            chunk=ChunkStorageMetadata(torch.Size(c.offsets), torch.Size(c.sizes)),
            properties=TensorProperties(dtype=c.dtype), size=torch.Size(c.global_shape)))
            for index, c in self._chunks.items()]
        self.plan = SavePlan(items, planner_data={})
        return self.plan

    def resolve_data(self, write_item: WriteItem):
        if write_item.type == WriteItemType.BYTE_IO:
            return io.BytesIO(self._objects[write_item.index.fqn])
        chunk = self._chunks[write_item.index]
        return torch.empty(chunk.sizes, dtype=chunk.dtype)


class _LayoutWriter(FileSystemWriter):
    """DCP's ``FileSystemWriter`` (planning, file naming, ``.metadata``) whose ``write_data``
    appends each item to the rank's one ``.distcp`` file itself, tensors through
    ``torch.save`` under ``skip_data`` (DCP's own item writer wraps the file in a stream that
    cannot seek, which skip_data needs)."""

    def write_data(self, plan: SavePlan, planner) -> Future:
        name = f"{plan.storage_data.prefix}0{DEFAULT_SUFFIX}"
        results = []
        with open(os.path.join(self.path, name), "wb") as f:
            for item in plan.items:
                offset = f.tell()
                data = planner.resolve_data(item)
                if item.type == WriteItemType.BYTE_IO:
                    f.write(data.getbuffer())
                else:
                    with torch.serialization.skip_data():
                        torch.save(data, f)
                length = f.tell() - offset
                results.append(WriteResult(index=item.index, size_in_bytes=length,
                                           storage_data=_StorageInfo(name, offset, length)))
        future: Future = Future()
        future.set_result(results)
        return future


def write_torch_dist_layout(directory: str, chunks: list[Chunk], object_keys: list[str]
                            ) -> dict[tuple[str, tuple[int, ...]], ChunkData]:
    """Write the files of a ``torch_dist`` checkpoint of ``chunks`` into ``directory`` with
    every chunk's data left unwritten (a hole reading as zeros); returns (key, offsets) ->
    where its bytes go. ``object_keys`` are DCP names of ``ShardedObject`` entries saved as
    ``None`` (``_extra_state`` without FP8 metadata)."""
    buf = io.BytesIO()
    torch.save([None], buf)  # Megatron stores a list of the rank's objects for each key
    objects = {name: buf.getvalue() for name in object_keys}
    # sync_files=False: the caller fsyncs once the data is in.
    writer = _LayoutWriter(directory, single_file_per_rank=True, sync_files=False)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp_save({}, storage_writer=writer, planner=_LayoutPlanner(chunks, objects),
                     no_dist=True)
    except CheckpointException as e:  # DCP wraps errors (e.g. a full disk) with tracebacks
        raise next(iter(e.failures.values()))[0] from None
    torch.save({}, os.path.join(directory, "common.pt"))
    with open(os.path.join(directory, "metadata.json"), "w") as f:
        json.dump(MEGATRON_METADATA, f)
    reader = TorchDistReader(directory)
    return {(c.key, c.offsets): reader.chunk_data(c.key, c.offsets) for c in chunks}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata`` and nothing else: its dataclasses, the save-plan
    dataclasses Megatron stores in it, torch sizes, dtypes, layouts and memory formats, paths
    and plain containers (Megatron's planner data)."""

    _ALLOWED = {
        "torch.distributed.checkpoint.metadata": {
            "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
            "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"},
        "torch.distributed.checkpoint.filesystem": {"_StorageInfo", "_StoragePrefix"},
        # Megatron's saves keep their cached save plans (plain dataclasses and an enum).
        "torch.distributed.checkpoint.planner": {
            "SavePlan", "WriteItem", "WriteItemType", "TensorWriteData", "BytesIOWriteData"},
        "torch": {"Size", "strided", "contiguous_format", "channels_last", "preserve_format",
                  *(str(d).removeprefix("torch.") for d in (
                      torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64,
                      torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool))},
        "torch.serialization": {"_get_layout"},  # how torch.layout pickles (by name)
        "pathlib": {"PosixPath", "PurePosixPath"},  # StorageMeta.checkpoint_id
        "collections": {"OrderedDict"},
        "builtins": {"set", "frozenset", "tuple", "list", "dict", "slice"},
    }

    def find_class(self, module: str, name: str):
        if name in self._ALLOWED.get(module, ()):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else ""


def read_metadata(directory: str) -> Metadata:
    """The DCP ``Metadata`` of a checkpoint directory; one-line ConversionError when absent,
    unreadable or not DCP metadata."""
    path = os.path.join(directory, ".metadata")
    if not os.path.isfile(path):
        raise ConversionError(f"{directory}: not a torch_dist checkpoint (no .metadata file)")
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except Exception as e:  # a corrupt pickle raises almost anything
        raise ConversionError(f"{path}: not a torch_dist .metadata file ({type(e).__name__}: "
                              f"{_first_line(e)})") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict) \
            or not isinstance(metadata.storage_data, dict):
        raise ConversionError(f"{path}: not a torch_dist .metadata file (holds "
                              f"{type(metadata).__name__})")
    return metadata


class _FileSlice(io.RawIOBase):
    """A read-only window ``[offset, offset + length)`` of a file, for ``torch.load`` (which
    reads through ``readinto``: straight into the tensor, in large blocks)."""

    def __init__(self, fd: int, offset: int, length: int):
        self._fd, self._start, self._len, self._pos = fd, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._len}[whence]
        self._pos = max(0, min(self._len, base + pos))
        return self._pos

    def readinto(self, b) -> int:
        n = min(len(memoryview(b).cast("B")), self._len - self._pos)
        pread_into(self._fd, memoryview(b).cast("B")[:n], self._start + self._pos)
        self._pos += n
        return n


class TorchDistReader:
    """The tensors of a ``torch_dist`` checkpoint directory: metadata checked on creation,
    chunk records located and checked on :meth:`chunk_data`."""

    def __init__(self, directory: str):
        self.directory = directory
        self._metadata = read_metadata(directory)
        self._storage = self._metadata.storage_data
        self.tensors: dict[str, TensorStorageMetadata] = {
            k: v for k, v in self._metadata.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata)}
        self._located: dict[tuple[str, tuple[int, ...]], ChunkData] = {}

    def global_shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].size)

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].properties.dtype

    def chunks(self, key: str) -> list[ChunkStorageMetadata]:
        return list(self.tensors[key].chunks)

    def _record(self, key: str, offsets: tuple[int, ...]) -> tuple[str, int, int]:
        """(path, offset, length) of the record holding the chunk at ``offsets``."""
        info = self._storage.get(MetadataIndex(key, torch.Size(offsets)))
        if info is None:
            raise ConversionError(f"{self.directory}/.metadata: tensor {key} chunk at "
                                  f"{list(offsets)} has no storage entry")
        path = os.path.normpath(os.path.join(self.directory, info.relative_path))
        if os.path.dirname(path) != os.path.normpath(self.directory):
            raise ConversionError(f"{self.directory}/.metadata: storage file "
                                  f"{info.relative_path!r} is outside the checkpoint")
        if getattr(info, "transform_descriptors", None):
            raise ConversionError(f"{path}: tensor {key} is stored with transforms "
                                  f"{info.transform_descriptors} (not supported)")
        size = os.path.getsize(path) if os.path.isfile(path) else -1
        if size < 0:
            raise ConversionError(f"{path}: missing (named by .metadata for tensor {key})")
        if info.offset < 0 or info.offset + info.length > size:
            raise ConversionError(f"{path}: truncated (tensor {key} record ends at byte "
                                  f"{info.offset + info.length}, the file has {size})")
        return path, info.offset, info.length

    def _load_record(self, key: str, offsets: tuple[int, ...], meta: bool
                     ) -> tuple[str, int, int, torch.Tensor]:
        """(path, offset, length) of the chunk's record and its tensor (``meta``: shape and
        storage location only), checked against ``.metadata``."""
        path, offset, length = self._record(key, offsets)
        fd = os.open(path, os.O_RDONLY)
        try:
            tensor = torch.load(_FileSlice(fd, offset, length), weights_only=True,
                                map_location="meta" if meta else "cpu")
        except Exception as e:  # corrupt records raise anything from the zip or the unpickler
            why = "refused by torch.load(weights_only=True)" if isinstance(
                e, pickle.UnpicklingError) else f"{type(e).__name__}: {_first_line(e)}"
            raise ConversionError(f"{path}: tensor {key} record at byte {offset} is unreadable "
                                  f"({why})") from None
        finally:
            os.close(fd)
        if not isinstance(tensor, torch.Tensor):
            raise ConversionError(f"{path}: tensor {key} record at byte {offset} holds a "
                                  f"{type(tensor).__name__}")
        chunk = next((c for c in self.tensors[key].chunks if tuple(c.offsets) == offsets), None)
        if tensor.dtype != self.dtype(key) or chunk is None or \
                tuple(tensor.shape) != tuple(chunk.sizes):
            raise ConversionError(f"{path}: tensor {key} record holds {tensor.dtype} "
                                  f"{list(tensor.shape)}, .metadata says {self.dtype(key)} "
                                  f"{list(chunk.sizes) if chunk is not None else '?'}")
        return path, offset, length, tensor

    def chunk_data(self, key: str, offsets: tuple[int, ...]) -> Optional[ChunkData]:
        """Where the chunk's bytes are (checked against ``.metadata``), or None when its record
        is not one C-contiguous run (then only :meth:`read` serves it)."""
        offsets = tuple(offsets)
        if (key, offsets) in self._located:
            return self._located[(key, offsets)]
        path, start, length, meta = self._load_record(key, offsets, meta=True)
        storage_start = getattr(meta.untyped_storage(), "_checkpoint_offset", None)
        located = None
        if storage_start is not None and meta.is_contiguous():
            data = start + storage_start + meta.storage_offset() * meta.element_size()
            if data + meta.nbytes > start + length:
                raise ConversionError(f"{path}: tensor {key} record at byte {start} is truncated")
            located = ChunkData(path, data, offsets, tuple(meta.shape), meta.dtype)
        self._located[(key, offsets)] = located
        return located

    def check(self) -> None:
        """Locate every chunk record, checking it against ``.metadata``: a corrupt, truncated
        or mislabelled record is a ConversionError before anything is read or written."""
        for key, md in self.tensors.items():
            if md.properties.dtype not in FLOAT_DTYPES:
                raise ConversionError(f"{self.directory}: tensor {key} is {md.properties.dtype}; "
                                      "only float32, bfloat16 and float16 checkpoints convert")
            for chunk in md.chunks:
                self.chunk_data(key, tuple(chunk.offsets))

    def read(self, key: str, layer: Optional[int] = None) -> torch.Tensor:
        """The global tensor ``key``, or its slice ``[layer]`` (layer-stacked keys), in memory."""
        md = self.tensors[key]
        shape = tuple(md.size)
        start = (layer, *[0] * (len(shape) - 1)) if layer is not None else (0,) * len(shape)
        size = (1, *shape[1:]) if layer is not None else shape
        out: Optional[torch.Tensor] = None
        for chunk in md.chunks:
            lo = [max(s, o) for s, o in zip(start, chunk.offsets)]
            hi = [min(s + n, o + m) for s, n, o, m in zip(start, size, chunk.offsets, chunk.sizes)]
            if any(h <= l for l, h in zip(lo, hi)):
                continue
            *_, data = self._load_record(key, tuple(chunk.offsets), meta=False)
            if tuple(chunk.offsets) == start and tuple(chunk.sizes) == size:
                out = data  # the common case: one chunk is exactly the region, no copy
                break
            if out is None:
                out = torch.empty(size, dtype=md.properties.dtype)
            src = data[tuple(slice(l - o, h - o) for l, h, o in zip(lo, hi, chunk.offsets))]
            out[tuple(slice(l - s, h - s) for l, h, s in zip(lo, hi, start))] = src
            del data
        if out is None:
            raise ConversionError(f"{self.directory}: tensor {key} has no stored data"
                                  + (f" for layer {layer}" if layer is not None else ""))
        return out[0] if layer is not None else out

    def row_segments(self, key: str, layer: Optional[int]) -> Optional[list[Segment]]:
        """The region ``key`` (``[layer]`` of a layer-stacked key) as stored runs of whole rows
        covering every row in order, or None when a chunk splits rows (e.g. a row-parallel TP
        shard) or has no plain layout, or the chunks do not cover the region exactly."""
        md = self.tensors[key]
        shape = tuple(md.size)
        row_dim = 1 if layer is not None else 0
        if len(shape) <= row_dim:
            return None
        row_bytes = math.prod(shape[row_dim + 1:]) * md.properties.dtype.itemsize
        segments = []
        for chunk in md.chunks:
            offsets, sizes = tuple(chunk.offsets), tuple(chunk.sizes)
            if layer is not None and not offsets[0] <= layer < offsets[0] + sizes[0]:
                continue
            if sizes[row_dim + 1:] != shape[row_dim + 1:]:
                return None  # the chunk holds part of each row
            located = self.chunk_data(key, offsets)
            if located is None:
                return None
            # A layer's rows follow the chunk's earlier layers: [layers, rows, ...] C-order.
            skip = (layer - offsets[0]) * sizes[row_dim] if layer is not None else 0
            segments.append(Segment(offsets[row_dim], sizes[row_dim], located.path,
                                    located.offset + skip * row_bytes))
        segments.sort(key=lambda s: s.first)
        row = 0
        for s in segments:
            if s.first != row:
                return None  # overlapping or missing rows: leave it to read()
            row += s.rows
        return segments if row == shape[row_dim] else None
