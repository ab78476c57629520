"""The tests' multi-process harness (see :mod:`repo_megatron.runtime.launch`)."""

from repo_megatron.runtime.launch import free_port, run_distributed  # noqa: F401
