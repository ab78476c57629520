"""File-system helpers shared by everything that writes atomically (checkpoints, converter
outputs): a rename is durable only once the renamed files and their directory are on disk."""

from __future__ import annotations

import os


def fsync_path(path: str) -> None:
    """fsync one file or directory."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
