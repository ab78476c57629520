"""``repo-megatron train CONFIG [--resume] [--dry-run] [key=value ...]``."""

from __future__ import annotations

import argparse
import sys

from ..config import load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config (see docs/config_reference.md)")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value",
                        help="Config overrides, e.g. rollout.group_size=4")
    parser.add_argument("--resume", action="store_true",
                        help="Continue from the newest complete checkpoint of the run directory")
    parser.add_argument("--dry-run", action="store_true",
                        help="Build the config's parallel layout with a scaled-down model on gloo "
                             "and run one step")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    try:
        from .loop import train
    except ModuleNotFoundError as e:
        if e.name != f"{__package__}.loop":
            raise
        print(f"{args.config}: configuration is valid; training is not implemented yet in this "
              "version (the trainer lands with the training-loop issue)", file=sys.stderr)
        return 2
    return train(cfg, resume=args.resume, dry_run=args.dry_run)
