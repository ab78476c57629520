"""The tests' multi-process harness (see :mod:`repo_megatron.runtime.launch`)."""

from repo_megatron.runtime.launch import run_distributed  # noqa: F401
from repo_megatron.runtime.ports import free_port  # noqa: F401
