"""``repo-megatron`` command line: train, convert, serve, plot, plan.

Each subcommand lives in the module that owns it, which provides ``add_arguments(parser)`` and
``run(args) -> int``; this file only dispatches. A subcommand whose module is not built yet says
so and exits non-zero. A :class:`~repo_megatron.errors.UserError` (configuration, data,
conversion and checkpoint errors, a run stopped by its guard: non-finite steps, failing
rewards) prints one line, never a traceback, and exits with its ``exit_code``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings
from typing import Optional, Sequence

from .errors import UserError

# name -> (module providing add_arguments/run, one-line help)
COMMANDS = {
    "train": ("repo_megatron.run.command", "Run RePO / GRPO training from a YAML config"),
    "convert": ("repo_megatron.convert.command",
                "Convert checkpoints between Hugging Face and Megatron (torch_dist)"),
    "serve": ("repo_megatron.engines.sglang_server.command",
              "Serve a model over SGLang's HTTP protocol with the embedded CPU engine"),
    "plot": ("repo_megatron.metrics.plot", "Plot the metrics of a run directory to PNG"),
    "plan": ("repo_megatron.plan.command", "Per-GPU memory plan of a config's layout"),
}


def _load(module_name: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            return None  # the subcommand's module does not exist yet
        raise


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser of every subcommand, or, given ``command``, of that one alone: the others
    are listed but their modules are not imported (``convert`` then starts without torch's
    training stack, transformers or the data pipeline)."""
    parser = argparse.ArgumentParser(prog="repo-megatron", description="RePO / GRPO post-training on Megatron-Core.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if command is not None and name != command:
            continue
        module = _load(module_name)
        if module is None:
            p.add_argument("rest", nargs=argparse.REMAINDER)
            p.set_defaults(_run=_not_built(name))
        else:
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
    return parser


def _not_built(name: str):
    def run(args) -> int:
        print(f"repo-megatron {name}: not implemented yet in this version", file=sys.stderr)
        return 2
    return run


def quiet_libraries() -> None:
    """Megatron logs every bucketed parameter and its configs at INFO, httpx every request,
    and megatron warns at import that apex / Transformer Engine are missing (the README says
    why that is fine on CPU)."""
    logging.getLogger("megatron").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)    # a line per judge / health request
    warnings.filterwarnings("ignore", message=r".*(Apex|apex|Transformer Engine).*(not installed|"
                                              r"Falling back).*")


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    quiet_libraries()
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)  # no top-level options
    args = build_parser(command if command in COMMANDS else None).parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except UserError as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
