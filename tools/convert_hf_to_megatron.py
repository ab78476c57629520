#!/usr/bin/env python
"""Hugging Face -> Megatron torch_dist: same arguments as `repo-megatron convert hf-to-megatron`."""

import sys

from repo_megatron.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", "hf-to-megatron", *sys.argv[1:]]))
