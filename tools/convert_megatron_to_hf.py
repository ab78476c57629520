#!/usr/bin/env python
"""Megatron torch_dist -> Hugging Face: same arguments as `repo-megatron convert megatron-to-hf`."""

import sys

from repo_megatron.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", "megatron-to-hf", *sys.argv[1:]]))
