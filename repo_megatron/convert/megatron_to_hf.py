"""Megatron-Core ``torch_dist`` checkpoint -> Hugging Face safetensors model directory.

Reads one (key, layer) region at a time from the checkpoint's chunks (any layout it was saved
in), splits it into HF tensors with the family's mapping (vocabulary rows truncated) and
streams them into safetensors shards whose headers were planned up front. The HF config and
tokenizer files come from the checkpoint's ``hf/`` directory (written at import) or from
``hf_config_dir``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from tqdm import tqdm

from ..config.base import ConfigError
from ..models.architecture import read_architecture
from .hf_to_megatron import HF_FILES_DIR
from ..models.weight_mapping import ModelDims, mappings_for, megatron_shape, tensor_order
from .reading import prefetched
from .safetensors_io import PlannedTensor, copy_model_files, write_safetensors
from .torch_dist_io import TorchDistReader

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


def check_megatron_tensors(reader: TorchDistReader, dims: ModelDims, mappings) -> None:
    """Missing, unexpected and wrongly shaped checkpoint tensors are errors naming the key."""
    where = reader.directory
    expected = {m.megatron: m for m in mappings}
    for key, m in expected.items():
        if key not in reader.tensors:
            raise ConfigError(f"{where}: tensor {key} is missing")
        found = reader.global_shape(key)
        shape = ((dims.arch.num_layers,) if m.per_layer else ()) + megatron_shape(
            m, dims, reader.tensors[key].properties.dtype)
        if found != shape:
            raise ConfigError(f"{where}: tensor {key} has shape {list(found)}, expected "
                              f"{list(shape)} from config.json")
    unexpected = sorted(set(reader.tensors) - set(expected))
    if unexpected:
        raise ConfigError(f"{where}: unexpected tensor {unexpected[0]}"
                          + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))


@dataclass(frozen=True)
class ExportSummary:
    out: str
    architecture: str
    files: list[str]
    bytes: int


def convert_megatron_to_hf(megatron_dir: str, out: str, hf_config_dir: Optional[str] = None,
                           dtype: Optional[torch.dtype] = None,
                           max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                           progress: bool = True) -> ExportSummary:
    """Export the checkpoint at ``megatron_dir`` as a HF model directory ``out`` (tensors in
    the checkpoint's dtype unless ``dtype`` is given)."""
    config_dir = hf_config_dir or os.path.join(megatron_dir, HF_FILES_DIR)
    if not os.path.exists(os.path.join(config_dir, "config.json")):
        raise ConfigError(f"{config_dir}: no config.json (checkpoints not made by "
                          "`repo-megatron convert hf-to-megatron` need --hf-config DIR)")
    arch = read_architecture(config_dir)
    mappings = mappings_for(arch)
    reader = TorchDistReader(megatron_dir)
    embedding = "embedding.word_embeddings.weight"
    if embedding not in reader.tensors:
        raise ConfigError(f"{megatron_dir}: tensor {embedding} is missing")
    # Whatever padding the checkpoint was written with: rows beyond the vocabulary are dropped.
    dims = ModelDims(arch, reader.global_shape(embedding)[0])
    if dims.padded_vocab_size < arch.vocab_size:
        raise ConfigError(f"{megatron_dir}: tensor {embedding} has {dims.padded_vocab_size} "
                          f"rows, fewer than vocab_size={arch.vocab_size} of config.json")
    check_megatron_tensors(reader, dims, mappings)

    order = tensor_order(mappings, arch.num_layers)
    planned = [PlannedTensor(name, shape, dtype or reader.tensors[m.megatron].properties.dtype)
               for m, layer in order
               for name, shape in zip(m.hf_names(layer), m.hf_shapes(arch))]
    total = sum(t.nbytes for t in planned)

    def region_bytes(item) -> int:
        m, layer = item
        shape = reader.global_shape(m.megatron)[1 if layer is not None else 0:]
        return math.prod(shape) * reader.tensors[m.megatron].properties.dtype.itemsize

    def tensors(bar) -> Iterator[tuple[str, torch.Tensor]]:
        # Read one region ahead of the writer while two fit in 2x the largest region.
        budget = 2 * max(region_bytes(item) for item in order)
        regions = prefetched(order, lambda item: reader.read(item[0].megatron, item[1]),
                             region_bytes, budget)
        for (m, layer), region in zip(order, regions):
            hf = m.to_hf(dims, region)
            del region
            for name, t in zip(m.hf_names(layer), hf):
                t = t if dtype is None else t.to(dtype)
                bar.update(t.nbytes)
                yield name, t

    os.makedirs(out, exist_ok=True)
    with tqdm(total=total, unit="B", unit_scale=True, desc="megatron-to-hf",
              disable=not progress) as bar:
        files = write_safetensors(out, planned, tensors(bar), max_shard_bytes)
    copy_model_files(config_dir, out)
    return ExportSummary(out, arch.hf_architecture, files, total)
