"""Megatron-Core ``torch_dist`` checkpoint -> Hugging Face safetensors model directory.

Everything is checked before anything is written: the config, every key's shape and dtype and
every chunk record (located and compared with ``.metadata``). The safetensors shards are
created with headers planned up front; each HF tensor is then copied into place from the
checkpoint's chunk records as byte ranges (the family's ``to_hf`` run on row ids,
:mod:`.row_plan`) when its region is stored as whole rows, which is how our converter and
Megatron's column-parallel (TP row) shards store it. Regions split by columns (row-parallel TP
shards) and dtype casts are read into memory one region at a time instead. The HF config and
tokenizer files come from the checkpoint's ``hf/`` directory (written at import) or from
``hf_config_dir``. The output is written into a temporary sibling of ``out`` and renamed into
place (:mod:`.output`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
from tqdm import tqdm

from ..errors import ConversionError
from ..hf_files import strip_gguf_quantization
from ..models.architecture import read_architecture
from ..models.weight_mapping import (ModelDims, ParamMapping, mappings_for, megatron_shape,
                                     tensor_order)
from .byte_copy import Computed, Write, run_writes
from .hf_to_megatron import HF_FILES_DIR
from .output import atomic_directory, check_output_directory
from .row_plan import row_pieces
from .safetensors_io import (PlannedTensor, byte_view, copy_model_files, create_shards,
                             shard_layout, write_index)
from .torch_dist_io import TorchDistReader

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


def check_megatron_tensors(reader: TorchDistReader, dims: ModelDims, mappings) -> None:
    """Missing, unexpected and wrongly shaped checkpoint tensors are errors naming the key;
    every chunk record is located and checked against ``.metadata``."""
    where = reader.directory
    expected = {m.megatron: m for m in mappings}
    for key, m in expected.items():
        if key not in reader.tensors:
            raise ConversionError(f"{where}: tensor {key} is missing")
        found = reader.global_shape(key)
        shape = ((dims.arch.num_layers,) if m.per_layer else ()) + megatron_shape(
            m, dims, reader.dtype(key))
        if found != shape:
            raise ConversionError(f"{where}: tensor {key} has shape {list(found)}, expected "
                                  f"{list(shape)} from config.json")
    unexpected = sorted(set(reader.tensors) - set(expected))
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise ConversionError(f"{where}: unexpected tensor {unexpected[0]}{more}")
    reader.check()


@dataclass(frozen=True)
class ExportSummary:
    out: str
    architecture: str
    files: list[str]
    bytes: int


def region_writes(reader: TorchDistReader, dims: ModelDims, m: ParamMapping,
                  layer: Optional[int], targets: list[tuple[str, int]],
                  dtype: Optional[torch.dtype]) -> list:
    """Writes of the HF tensors of one (mapping, layer) region to ``targets`` (path, offset):
    byte copies when the region is stored as whole rows and no cast is asked for, else one
    computed write (the region read into memory)."""
    segments = None if dtype is not None or not m.moves_rows \
        else reader.row_segments(m.megatron, layer)
    shape = reader.global_shape(m.megatron)[1 if layer is not None else 0:]
    if segments is not None:
        row_bytes = math.prod(shape[1:]) * reader.dtype(m.megatron).itemsize
        rows = m.to_hf(dims, torch.arange(shape[0]))
        return [Write(path, offset, tuple(row_pieces(r, segments, row_bytes)))
                for r, (path, offset) in zip(rows, targets)]

    def compute():
        region = reader.read(m.megatron, layer)
        for t, (path, offset) in zip(m.to_hf(dims, region), targets):
            data = (t if dtype is None else t.to(dtype)).contiguous()
            yield path, offset, byte_view(data)

    nbytes = math.prod(shape) * (dtype or reader.dtype(m.megatron)).itemsize
    return [Computed(compute, nbytes)]


def convert_megatron_to_hf(megatron_dir: str, out: str, hf_config_dir: Optional[str] = None,
                           dtype: Optional[torch.dtype] = None,
                           max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                           progress: bool = True, overwrite: bool = False,
                           threads: int = 2) -> ExportSummary:
    """Export the checkpoint at ``megatron_dir`` as a HF model directory ``out`` (tensors in
    the checkpoint's dtype unless ``dtype`` is given). ``out`` must not exist or be empty,
    unless ``overwrite`` (then it is replaced whole once the export is complete)."""
    if max_shard_bytes <= 0:
        raise ConversionError(f"--max-shard-size-gb {max_shard_bytes / 2**30:g}: must be positive")
    check_output_directory(os.path.abspath(out), overwrite)
    config_dir = hf_config_dir or os.path.join(megatron_dir, HF_FILES_DIR)
    if not os.path.exists(os.path.join(config_dir, "config.json")):
        raise ConversionError(f"{config_dir}: no config.json (checkpoints not made by "
                              "`repo-megatron convert hf-to-megatron` need --hf-config DIR)")
    arch = read_architecture(config_dir)
    mappings = mappings_for(arch)
    reader = TorchDistReader(megatron_dir)
    embedding = "embedding.word_embeddings.weight"
    if embedding not in reader.tensors:
        raise ConversionError(f"{megatron_dir}: tensor {embedding} is missing")
    # Whatever padding the checkpoint was written with: rows beyond the vocabulary are dropped.
    dims = ModelDims(arch, reader.global_shape(embedding)[0])
    if dims.padded_vocab_size < arch.vocab_size:
        raise ConversionError(f"{megatron_dir}: tensor {embedding} has {dims.padded_vocab_size} "
                              f"rows, fewer than vocab_size={arch.vocab_size} of config.json")
    check_megatron_tensors(reader, dims, mappings)

    order = tensor_order(mappings, arch.num_layers)
    planned = [PlannedTensor(name, shape, dtype or reader.dtype(m.megatron))
               for m, layer in order for name, shape in zip(m.hf_names(layer), m.hf_shapes(arch))]
    total = sum(t.nbytes for t in planned)
    shards = shard_layout(planned, max_shard_bytes)
    with atomic_directory(out, overwrite) as tmp:
        where = {name: (os.path.join(tmp, s.file), offset)
                 for s in shards for name, offset in s.offsets.items()}
        create_shards(tmp, shards)
        writes = [w for m, layer in order for w in region_writes(
            reader, dims, m, layer, [where[n] for n in m.hf_names(layer)], dtype)]
        with tqdm(total=total, unit="B", unit_scale=True, desc="megatron-to-hf",
                  disable=not progress) as bar:
            run_writes(writes, threads, on_bytes=bar.update)
        write_index(tmp, shards, total)
        copy_model_files(config_dir, tmp, edit_config=strip_gguf_quantization)
    return ExportSummary(os.path.abspath(out), arch.hf_architecture, [s.file for s in shards],
                         total)
