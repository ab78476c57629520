"""``repo-megatron train CONFIG [--resume] [--dry-run] [key=value ...]``."""

from __future__ import annotations

import argparse
import logging

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
    parser.add_argument("--dry-run-dp", type=int, default=1, metavar="N",
                        help="Data-parallel size of the dry run (default 1)")


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    logging.getLogger().setLevel(cfg.logging.level)
    if args.dry_run:  # this process only launches the ranks: it imports no trainer
        from .dry_run import dry_run
        return dry_run(cfg, data_parallel_size=args.dry_run_dp)
    from .loop import train
    return train(cfg, resume=args.resume)
