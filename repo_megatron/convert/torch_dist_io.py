"""Megatron ``torch_dist`` checkpoints written and read tensor by tensor, without a model.

A ``torch_dist`` checkpoint is a PyTorch Distributed Checkpoint (DCP) directory of global
tensors stored as chunks, plus Megatron's ``metadata.json`` and ``common.pt``.
:func:`write_torch_dist` saves through DCP's own ``FileSystemWriter`` with a planner that
computes each chunk only when the writer asks for it (``resolve_data``), so memory holds the
chunk group being written and at most one read ahead. :class:`TorchDistReader` reads any region of a key from whatever chunks
a checkpoint holds (ours, or Megatron's own TP/PP-sharded saves).
"""

from __future__ import annotations

import io
import json
import math
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (ChunkStorageMetadata, MetadataIndex,
                                                   TensorProperties, TensorStorageMetadata)
from torch.distributed.checkpoint.planner import (SavePlan, TensorWriteData, WriteItem,
                                                  WriteItemType)

from ..config.base import ConfigError
from .reading import pread_into, prefetched

# What megatron.core.dist_checkpointing.save writes next to the DCP files.
MEGATRON_METADATA = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                     "common_backend": "torch", "common_backend_version": 1}


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
class ChunkGroup:
    """Chunks computed together: ``compute()`` returns their tensors in order (each of shape
    ``chunk.sizes``), e.g. the gate and up pieces of one layer's ``linear_fc1``."""
    chunks: tuple[Chunk, ...]
    compute: Callable[[], list[torch.Tensor]]


def sharded_object_key(key: str, offset: int, count: int) -> str:
    """DCP name Megatron gives the ``ShardedObject`` of layer ``offset`` out of ``count``."""
    return f"{key}/shard_{offset}_{count}"


class _LazySavePlanner(DefaultSavePlanner):
    """A save plan made from chunk descriptions; data is computed in ``resolve_data``.

    Groups are computed in the order the writer asks for their chunks, one group ahead of
    it within ``budget`` bytes (:func:`~.reading.prefetched`); a group's chunks wait in
    ``_pending`` until written."""

    def __init__(self, groups: list[ChunkGroup], objects: dict[str, bytes],
                 on_chunk: Callable[[int], None], budget: int):
        super().__init__()
        self._groups = groups
        self._objects = objects
        self._on_chunk = on_chunk
        self._budget = budget
        self._where: dict[MetadataIndex, tuple[int, int]] = {}
        self._pending: dict[int, dict[int, torch.Tensor]] = {}
        self._stream: Optional[Iterator[tuple[int, list[torch.Tensor]]]] = None
        self._written: Optional[torch.Tensor] = None

    def create_local_plan(self) -> SavePlan:
        items = [WriteItem(index=MetadataIndex(name), type=WriteItemType.BYTE_IO)
                 for name in self._objects]
        for g, group in enumerate(self._groups):
            for c, chunk in enumerate(group.chunks):
                index = MetadataIndex(chunk.key, torch.Size(chunk.offsets))
                self._where[index] = (g, c)
                items.append(WriteItem(index=index, type=WriteItemType.SHARD, tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(torch.Size(chunk.offsets), torch.Size(chunk.sizes)),
                    properties=TensorProperties(dtype=chunk.dtype),
                    size=torch.Size(chunk.global_shape))))
        self.plan = SavePlan(items, planner_data={})
        return self.plan

    def _write_order(self) -> list[int]:
        """Groups in the order of the final plan, which a one-thread writer follows (any
        other order stays correct: groups computed early wait in ``_pending``)."""
        return list(dict.fromkeys(self._where[i.index][0] for i in self.plan.items
                                  if i.type != WriteItemType.BYTE_IO))

    def _compute(self, g: int) -> tuple[int, list[torch.Tensor]]:
        group = self._groups[g]
        return g, [t.reshape(ch.sizes).contiguous() for t, ch in zip(group.compute(), group.chunks)]

    def resolve_data(self, write_item: WriteItem):
        if write_item.type == WriteItemType.BYTE_IO:
            return io.BytesIO(self._objects[write_item.index.fqn])
        if self._stream is None:
            nbytes = lambda g: sum(c.nbytes for c in self._groups[g].chunks)  # noqa: E731
            self._stream = prefetched(self._write_order(), self._compute, nbytes, self._budget)
        g, c = self._where[write_item.index]
        while g not in self._pending:
            done, tensors = next(self._stream)
            self._pending[done] = dict(enumerate(tensors))
        tensor = self._pending[g].pop(c)
        if not self._pending[g]:
            del self._pending[g]
        self._release_written()
        self._written = tensor
        self._on_chunk(tensor.nbytes)
        return tensor

    def _release_written(self) -> None:
        """Free the chunk handed out before: the writer asks for the next one only once it is
        written, but keeps a reference to every tensor it wrote until the file is closed
        (for its safetensors format), which would hold the whole model in memory."""
        if self._written is None:
            return
        storage = self._written.untyped_storage()
        in_use = {t.untyped_storage().data_ptr() for p in self._pending.values() for t in p.values()}
        if storage.data_ptr() not in in_use:
            storage.resize_(0)
        self._written = None


def write_torch_dist(directory: str, groups: list[ChunkGroup], object_keys: list[str],
                     budget: int, on_chunk: Callable[[int], None] = lambda nbytes: None) -> None:
    """Write a Megatron ``torch_dist`` checkpoint of ``groups`` into ``directory`` in this
    process (no process group needed), holding at most ``budget`` bytes of computed chunks
    (and at least one group). ``object_keys`` are DCP names of ``ShardedObject`` entries
    saved as ``None`` (the local spec's ``_extra_state``)."""
    os.makedirs(directory, exist_ok=True)
    buf = io.BytesIO()
    torch.save([None], buf)  # Megatron stores a list of the rank's objects for each key
    objects = {name: buf.getvalue() for name in object_keys}
    writer = FileSystemWriter(directory, single_file_per_rank=True, thread_count=1)
    crc32 = torch.serialization.get_crc32_options()
    # torch.save's CRC32 of every record costs as much CPU as the write itself here; the
    # loaders (torch.load, DCP) do not check it.
    torch.serialization.set_crc32_options(False)
    try:
        with warnings.catch_warnings():  # "assuming the intent is to save in one process": yes
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp_save({}, storage_writer=writer,
                     planner=_LazySavePlanner(groups, objects, on_chunk, budget), no_dist=True)
    finally:
        torch.serialization.set_crc32_options(crc32)
    torch.save({}, os.path.join(directory, "common.pt"))
    with open(os.path.join(directory, "metadata.json"), "w") as f:
        json.dump(MEGATRON_METADATA, f)


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
    """Random access to the tensors of a ``torch_dist`` checkpoint directory."""

    def __init__(self, directory: str):
        if not os.path.exists(os.path.join(directory, ".metadata")):
            raise ConfigError(f"{directory}: not a torch_dist checkpoint (no .metadata file)")
        self.directory = directory
        reader = FileSystemReader(directory)
        self._metadata = reader.read_metadata()
        self._storage = self._metadata.storage_data
        self.tensors: dict[str, TensorStorageMetadata] = {
            k: v for k, v in self._metadata.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata)}

    def global_shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].size)

    def _load_chunk(self, key: str, chunk: ChunkStorageMetadata) -> torch.Tensor:
        info = self._storage[MetadataIndex(key, chunk.offsets)]
        fd = os.open(os.path.join(self.directory, info.relative_path), os.O_RDONLY)
        try:
            return torch.load(_FileSlice(fd, info.offset, info.length), map_location="cpu",
                              weights_only=True)
        finally:
            os.close(fd)

    def read(self, key: str, layer: Optional[int] = None) -> torch.Tensor:
        """The global tensor ``key``, or its slice ``[layer]`` (layer-stacked keys)."""
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
            data = self._load_chunk(key, chunk)
            if tuple(chunk.offsets) == start and tuple(chunk.sizes) == size:
                out = data  # the common case: one chunk is exactly the region, no copy
                break
            if out is None:
                out = torch.empty(size, dtype=md.properties.dtype)
            src = data[tuple(slice(l - o, h - o) for l, h, o in zip(lo, hi, chunk.offsets))]
            out[tuple(slice(l - s, h - s) for l, h, s in zip(lo, hi, start))] = src
            del data
        if out is None:
            raise ConfigError(f"{self.directory}: tensor {key} has no stored data"
                              + (f" for layer {layer}" if layer is not None else ""))
        return out[0] if layer is not None else out
