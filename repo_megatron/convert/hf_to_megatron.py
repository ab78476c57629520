"""Hugging Face safetensors (or GGUF) -> Megatron-Core ``torch_dist`` checkpoint.

Everything is checked before anything is written: the architecture and parallel layout, every
shard's header, tensor names, shapes and dtypes (one floating dtype for the whole model), and a
tied model's redundant ``lm_head.weight``. Then the checkpoint's files are laid out by DCP's own
writer with holes for the data (:func:`~.torch_dist_io.write_torch_dist_layout`), and the
tensors' bytes are copied into them: the families' transforms only move whole rows, so running
them on row ids (:mod:`.row_plan`) turns one layer's fused QKV, gate+up pieces or padded
vocabulary into byte ranges of the HF files, copied in the kernel (:mod:`.byte_copy`).

The checkpoint holds global tensors (loadable in any TP/PP/VPP layout whose padded vocabulary
matches, see ``docs/convert.md``) and, under ``hf/``, the HF config and tokenizer files, so that
export needs nothing else. It is written into a temporary sibling of ``out`` and renamed into
place (:mod:`.output`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from typing import Optional

import torch
from tqdm import tqdm

from ..errors import ConfigError, ConversionError
from ..hf_files import resolve_gguf, strip_gguf_quantization
from ..models.architecture import Architecture, padded_vocab_size, read_architecture
from ..models.weight_mapping import (LAYER_PREFIX, ModelDims, ParamMapping, extra_state_keys,
                                     mappings_for, megatron_piece_shapes, stacked_shape,
                                     tensor_order)
from .byte_copy import Computed, Write, run_writes
from .output import atomic_directory, check_output_directory
from .row_plan import Segment, row_pieces
from .safetensors_io import (NAMES, SafetensorsCheckpoint, byte_view, copy_model_files,
                             same_bytes)
from .torch_dist_io import (FLOAT_DTYPES, Chunk, ChunkData, sharded_object_key,
                            write_torch_dist_layout)

log = logging.getLogger(__name__)

HF_FILES_DIR = "hf"              # HF config + tokenizer files inside a converted checkpoint
CONVERT_INFO = "convert.json"    # how the checkpoint was made (vocabulary padding, source)
TIED_HEAD = ("lm_head.weight", "model.embed_tokens.weight")


def check_arguments(tp: int, pp: int, vpp: Optional[int], divisible_by: int) -> None:
    """The numeric flags are positive."""
    for flag, value in (("--tp", tp), ("--pp", pp), ("--vpp", vpp),
                        ("--make-vocab-size-divisible-by", divisible_by)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ConversionError(f"{flag} {value}: must be a positive integer")


def check_parallel_layout(arch: Architecture, tp: int, pp: int, vpp: Optional[int]) -> None:
    """The layout's divisibility rules (TP divides heads and KV heads, PP x VPP divides the
    layers), with the trainer's own messages prefixed by the converter's flags."""
    from ..config import Config, check_layout
    from ..config.parallel import ParallelConfig

    try:
        check_layout(Config(parallel=ParallelConfig(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
            virtual_pipeline_model_parallel_size=vpp)), arch)
    except ConfigError as e:  # the trainer's message, said in the converter's flags
        raise ConversionError(f"--tp {tp} --pp {pp}" + (f" --vpp {vpp}" if vpp else "")
                              + f": {e.message}") from None


def expected_hf_tensors(arch: Architecture, mappings) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name the family's mapping needs, with its shape."""
    out = {}
    for m, layer in tensor_order(mappings, arch.num_layers):
        out.update(zip(m.hf_names(layer), m.hf_shapes(arch)))
    return out


def check_hf_tensors(source: SafetensorsCheckpoint, arch: Architecture,
                     expected: dict[str, tuple[int, ...]]) -> torch.dtype:
    """Missing, unexpected and wrongly shaped tensors, non-float or mixed dtypes are errors
    naming the tensor and its file; returns the model's dtype. A tied model's ``lm_head.weight``
    is accepted (and ignored) when it equals the embedding."""
    where = source.directory

    def file_of(name: str) -> str:
        return f"{where}/{source.files[name]}"

    for name, shape in expected.items():
        if name not in source.files:
            raise ConversionError(f"{where}: tensor {name} is missing")
        found = source.location(name).shape
        if found != tuple(shape):
            raise ConversionError(f"{file_of(name)}: tensor {name} has shape {list(found)}, "
                                  f"expected {list(shape)} from config.json")
    unexpected = sorted(set(source.files) - set(expected))
    head, embedding = TIED_HEAD
    if arch.tie_word_embeddings and head in unexpected:
        if not same_bytes(source.location(head), source.location(embedding)):
            raise ConversionError(f"{file_of(head)}: tensor {head} differs from {embedding}, but "
                                  "config.json has tie_word_embeddings=true (set it to false to "
                                  "keep a separate output layer)")
        unexpected.remove(head)
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise ConversionError(f"{file_of(unexpected[0])}: unexpected tensor {unexpected[0]}{more}")
    first = next(iter(expected))
    dtype = source.location(first).dtype
    for name in expected:
        found = source.location(name).dtype
        if found not in FLOAT_DTYPES:
            raise ConversionError(f"{file_of(name)}: tensor {name} is {NAMES[found]}; only F32, "
                                  "BF16 and F16 checkpoints convert (dequantize it first)")
        if found != dtype:
            raise ConversionError(f"{file_of(name)}: tensor {name} is {NAMES[found]} but {first} "
                                  f"is {NAMES[dtype]}; mixed dtypes are not supported (save the "
                                  "model in one dtype)")
    return dtype


@dataclass(frozen=True)
class TensorGroup:
    """One (mapping, layer): its HF tensors and the Megatron chunks made from them."""
    mapping: ParamMapping
    layer: Optional[int]
    hf_names: tuple[str, ...]
    chunks: tuple[Chunk, ...]


def plan_chunks(dims: ModelDims, mappings, dtype: torch.dtype) -> list[TensorGroup]:
    """One group per (mapping, layer); its chunks are the row pieces that ``to_megatron``
    returns (:func:`megatron_piece_shapes`, HF tensors of ``dtype``). Layer keys: chunk
    ``[1, rows, ...]`` at ``(layer, row, 0...)`` of ``[num_layers, *shape]``."""
    layers = dims.arch.num_layers
    groups = []
    for m, layer in tensor_order(mappings, layers):
        pieces = megatron_piece_shapes(m, dims, dtype)
        shape = stacked_shape(pieces)
        lead = ((layer,), (1,), (layers,)) if m.per_layer else ((), (), ())
        chunks, row = [], 0
        for p in pieces:
            chunks.append(Chunk(m.megatron, lead[2] + shape,
                                lead[0] + (row,) + (0,) * (len(p) - 1), lead[1] + p, dtype))
            row += p[0]
        groups.append(TensorGroup(m, layer, m.hf_names(layer), tuple(chunks)))
    return groups


def _row_bytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape[1:]) * dtype.itemsize


def group_writes(source: SafetensorsCheckpoint, dims: ModelDims, group: TensorGroup,
                 where: dict[tuple[str, tuple[int, ...]], ChunkData]) -> list:
    """The writes that fill ``group``'s chunks: byte copies planned on row ids when the
    mapping only moves rows, else one computed write."""
    m, locations = group.mapping, [source.location(n) for n in group.hf_names]
    targets = [where[(c.key, c.offsets)] for c in group.chunks]
    row_bytes = {_row_bytes(t.shape, t.dtype) for t in locations}
    if m.moves_rows and len(row_bytes) == 1:
        # Id 0 is a zero row (vocabulary padding); HF tensor j's row r is base_j + r + 1.
        segments, ids, base = [], [], 1
        for t in locations:
            segments.append(Segment(base, t.shape[0], t.path, t.offset))
            ids.append(torch.arange(base, base + t.shape[0]))
            base += t.shape[0]
        (size,) = row_bytes
        return [Write(target.path, target.offset, tuple(row_pieces(piece, segments, size, 0)))
                for piece, target in zip(m.to_megatron(dims, ids), targets)]

    def compute():
        tensors = m.to_megatron(dims, [source.get(n) for n in group.hf_names])
        for tensor, target in zip(tensors, targets):
            data = tensor.contiguous()
            yield target.path, target.offset, byte_view(data)

    return [Computed(compute, sum(c.nbytes for c in group.chunks))]


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

    src, name = resolve_gguf(hf_path, gguf_file)
    log.info("Dequantizing %s/%s through transformers", src, name)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name)
    # transformers refuses save_pretrained on a GGUF-loaded model: write what it would.
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    model.config.architectures = [type(model).__name__]  # save_pretrained would set it
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.save_pretrained(directory)
    model.generation_config.save_pretrained(directory)
    AutoTokenizer.from_pretrained(src, gguf_file=name).save_pretrained(directory)


def convert_hf_to_megatron(hf_dir: Optional[str], out: str, tp: int = 1, pp: int = 1,
                           vpp: Optional[int] = None, make_vocab_size_divisible_by: int = 128,
                           gguf_file: Optional[str] = None, progress: bool = True,
                           overwrite: bool = False, threads: int = 2) -> ImportSummary:
    """Convert a HF model directory (or GGUF file) into a ``torch_dist`` checkpoint at ``out``.

    ``tp`` fixes the vocabulary padding (``padded_vocab_size(vocab, divisible_by, tp)``);
    ``tp``, ``pp`` and ``vpp`` are checked against the architecture. ``out`` must not exist
    or be empty, unless ``overwrite`` (then it is replaced whole once the new checkpoint is
    complete)."""
    check_arguments(tp, pp, vpp, make_vocab_size_divisible_by)
    check_output_directory(os.path.abspath(out), overwrite)
    if gguf_file is not None:
        parent = os.path.dirname(os.path.abspath(out))  # the dequantized copy goes beside out
        os.makedirs(parent, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=parent, prefix=".gguf-") as tmp:
            materialize_gguf(hf_dir, gguf_file, tmp)
            return convert_hf_to_megatron(tmp, out, tp, pp, vpp, make_vocab_size_divisible_by,
                                          progress=progress, overwrite=overwrite,
                                          threads=threads)
    arch = read_architecture(hf_dir)
    check_parallel_layout(arch, tp, pp, vpp)
    mappings = mappings_for(arch)
    dims = ModelDims(arch, padded_vocab_size(arch.vocab_size, make_vocab_size_divisible_by, tp))
    source = SafetensorsCheckpoint(hf_dir)
    dtype = check_hf_tensors(source, arch, expected_hf_tensors(arch, mappings))
    groups = plan_chunks(dims, mappings, dtype)
    chunks = [c for g in groups for c in g.chunks]
    objects = []
    for key in extra_state_keys(mappings):  # one object per layer of layer-stacked modules
        count = arch.num_layers if key.startswith(LAYER_PREFIX) else 1
        objects += [sharded_object_key(key, i, count) for i in range(count)]
    total = sum(c.nbytes for c in chunks)
    with atomic_directory(out, overwrite) as tmp:
        where = write_torch_dist_layout(tmp, chunks, objects)
        writes = [w for g in groups for w in group_writes(source, dims, g, where)]
        with tqdm(total=total, unit="B", unit_scale=True, desc="hf-to-megatron",
                  disable=not progress) as bar:
            run_writes(writes, threads, on_bytes=bar.update)
        copy_model_files(hf_dir, os.path.join(tmp, HF_FILES_DIR),
                         edit_config=strip_gguf_quantization)
        with open(os.path.join(tmp, CONVERT_INFO), "w") as f:
            json.dump({"hf_architecture": arch.hf_architecture, "vocab_size": arch.vocab_size,
                       "padded_vocab_size": dims.padded_vocab_size,
                       "tensor_model_parallel_size": tp,
                       "make_vocab_size_divisible_by": make_vocab_size_divisible_by}, f, indent=2)
    return ImportSummary(os.path.abspath(out), arch.hf_architecture, len(source.files), total,
                         dims.padded_vocab_size)
