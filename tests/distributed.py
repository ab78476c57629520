"""The tests' multi-process harness (see :mod:`repo_megatron.runtime.launch`)."""

from repo_megatron.runtime.launch import run_distributed  # noqa: F401
