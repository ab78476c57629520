"""Hugging Face safetensors (or GGUF) -> Megatron-Core ``torch_dist`` checkpoint.

Streams tensor by tensor: HF tensors are memory-mapped, each Megatron chunk group (one layer's
fused QKV, gate+up pieces, ...) is computed when DCP's writer asks for it and dropped once
written. The checkpoint holds global tensors (loadable in any TP/PP/VPP layout whose padded
vocabulary matches, see ``docs/convert.md``) and, under ``hf/``, the HF config and tokenizer
files, so that export needs nothing else.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Optional

from tqdm import tqdm

from ..config.base import ConfigError
from ..models.architecture import Architecture, padded_vocab_size, read_architecture
from ..models.weight_mapping import ModelDims, extra_state_keys, mappings_for, tensor_order
from .safetensors_io import SafetensorsCheckpoint, copy_model_files
from .torch_dist_io import Chunk, ChunkGroup, sharded_object_key, write_torch_dist

log = logging.getLogger(__name__)

HF_FILES_DIR = "hf"              # HF config + tokenizer files inside a converted checkpoint
CONVERT_INFO = "convert.json"    # how the checkpoint was made (vocabulary padding, source)


def check_parallel_layout(arch: Architecture, tp: int, pp: int, vpp: Optional[int]) -> None:
    """The layout's divisibility rules (TP divides heads and KV heads, PP x VPP divides the
    layers), with the trainer's own messages prefixed by the converter's flags."""
    from ..config import Config, check_layout
    from ..config.parallel import ParallelConfig

    try:
        check_layout(Config(parallel=ParallelConfig(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
            virtual_pipeline_model_parallel_size=vpp)), arch)
    except ConfigError as e:
        raise ConfigError(f"--tp {tp} --pp {pp}" + (f" --vpp {vpp}" if vpp else "")
                          + f": {e.message}") from None


def expected_hf_tensors(arch: Architecture, mappings) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name the family's mapping needs, with its shape."""
    out = {}
    for m, layer in tensor_order(mappings, arch.num_layers):
        out.update(zip(m.hf_names(layer), m.hf_shapes(arch)))
    return out


def check_hf_tensors(source: SafetensorsCheckpoint, expected: dict[str, tuple[int, ...]]) -> None:
    """Missing, unexpected and wrongly shaped tensors are errors naming the tensor."""
    where = source.directory
    for name, shape in expected.items():
        if name not in source.files:
            raise ConfigError(f"{where}: tensor {name} is missing")
        found = tuple(source.meta(name).shape)
        if found != tuple(shape):
            raise ConfigError(f"{where}/{source.files[name]}: tensor {name} has shape "
                              f"{list(found)}, expected {list(shape)} from config.json")
    unexpected = sorted(set(source.files) - set(expected))
    if unexpected:
        raise ConfigError(f"{where}/{source.files[unexpected[0]]}: unexpected tensor "
                          f"{unexpected[0]}" + (f" (and {len(unexpected) - 1} more)"
                                                if len(unexpected) > 1 else ""))


def chunk_groups(source: SafetensorsCheckpoint, dims: ModelDims, mappings) -> list[ChunkGroup]:
    """One lazily computed group per (mapping, layer); its chunks are the row pieces that
    ``to_megatron`` returns, planned from meta tensors."""
    layers = dims.arch.num_layers
    groups = []
    for m, layer in tensor_order(mappings, layers):
        names = m.hf_names(layer)
        pieces = m.to_megatron(dims, [source.meta(n) for n in names])
        shape = (sum(p.shape[0] for p in pieces), *pieces[0].shape[1:])
        # Layer keys: chunk [1, rows, ...] at (layer, row, 0...) of [num_layers, *shape].
        lead = ((layer,), (1,), (layers,)) if m.per_layer else ((), (), ())
        chunks, row = [], 0
        for p in pieces:
            chunks.append(Chunk(m.megatron, lead[2] + shape,
                                lead[0] + (row,) + (0,) * (p.dim() - 1),
                                lead[1] + tuple(p.shape), p.dtype))
            row += p.shape[0]
        groups.append(ChunkGroup(tuple(chunks), lambda m=m, names=names: m.to_megatron(
            dims, [source.get(n) for n in names])))
    return groups


@dataclass(frozen=True)
class ImportSummary:
    out: str
    architecture: str
    tensors: int
    bytes: int
    padded_vocab_size: int


def materialize_gguf(hf_path: Optional[str], gguf_file: str, directory: str) -> None:
    """Dequantize a GGUF model through transformers into a safetensors model directory (the
    GGUF tensors are quantized, so this step holds the model in memory, unlike the rest)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..hf_files import resolve_gguf

    src, name = resolve_gguf(hf_path, gguf_file)
    log.info("Dequantizing %s/%s through transformers", src, name)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name)
    # transformers refuses save_pretrained on a GGUF-loaded model: write what it would.
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    model.config.architectures = [type(model).__name__]  # save_pretrained would set it
    model.config.save_pretrained(directory)
    model.generation_config.save_pretrained(directory)
    AutoTokenizer.from_pretrained(src, gguf_file=name).save_pretrained(directory)


def convert_hf_to_megatron(hf_dir: Optional[str], out: str, tp: int = 1, pp: int = 1,
                           vpp: Optional[int] = None, make_vocab_size_divisible_by: int = 128,
                           gguf_file: Optional[str] = None,
                           progress: bool = True) -> ImportSummary:
    """Convert a HF model directory (or GGUF file) into a ``torch_dist`` checkpoint at ``out``.

    ``tp`` fixes the vocabulary padding (``padded_vocab_size(vocab, divisible_by, tp)``);
    ``tp``, ``pp`` and ``vpp`` are checked against the architecture."""
    if gguf_file is not None:
        parent = os.path.dirname(os.path.abspath(out))  # the dequantized copy goes beside out
        os.makedirs(parent, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=parent) as tmp:
            materialize_gguf(hf_dir, gguf_file, tmp)
            return convert_hf_to_megatron(tmp, out, tp, pp, vpp, make_vocab_size_divisible_by,
                                          progress=progress)
    arch = read_architecture(hf_dir)
    check_parallel_layout(arch, tp, pp, vpp)
    mappings = mappings_for(arch)
    dims = ModelDims(arch, padded_vocab_size(arch.vocab_size, make_vocab_size_divisible_by, tp))
    source = SafetensorsCheckpoint(hf_dir)
    check_hf_tensors(source, expected_hf_tensors(arch, mappings))
    groups = chunk_groups(source, dims, mappings)
    objects = [sharded_object_key(key, layer, arch.num_layers)
               for key in extra_state_keys(mappings) for layer in range(arch.num_layers)]
    total = sum(c.nbytes for g in groups for c in g.chunks)
    # Read one group ahead of the writer while two fit in 2x the largest HF tensor.
    largest = max(source.meta(n).nbytes for n in source.files)
    with tqdm(total=total, unit="B", unit_scale=True, desc="hf-to-megatron",
              disable=not progress) as bar:
        write_torch_dist(out, groups, objects, budget=2 * largest, on_chunk=bar.update)
    copy_model_files(hf_dir, os.path.join(out, HF_FILES_DIR))
    with open(os.path.join(out, CONVERT_INFO), "w") as f:
        json.dump({"hf_architecture": arch.hf_architecture, "vocab_size": arch.vocab_size,
                   "padded_vocab_size": dims.padded_vocab_size,
                   "tensor_model_parallel_size": tp,
                   "make_vocab_size_divisible_by": make_vocab_size_divisible_by}, f, indent=2)
    return ImportSummary(out, arch.hf_architecture, len(source.files), total,
                         dims.padded_vocab_size)

