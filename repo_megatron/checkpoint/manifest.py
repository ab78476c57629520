"""A checkpoint's manifest: the size and SHA-256 of every file, recorded at save time from the
files on disk and checked before the checkpoint is trusted (pure file I/O, no torch).

Megatron's ``dist_checkpointing`` validates which shards exist, not what they hold: 1 MB of
garbage in a ``.distcp`` file loads silently as garbage weights. The manifest catches that,
truncated and missing files, and files that were added afterwards.
"""

from __future__ import annotations

import hashlib
import os
import stat
from typing import Iterable, Mapping

_CHUNK = 8 << 20


def list_files(directory: str) -> list[str]:
    """Every regular file under ``directory`` as a sorted relative path (``rng/rank_00000.pt``)."""
    found = []
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in files:
            found.append(os.path.relpath(os.path.join(root, name), directory))
    return sorted(found)


def file_entry(path: str) -> dict:
    """``{"size": bytes, "sha256": hex digest}`` of one file."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": digest.hexdigest()}


def build_entries(directory: str, names: Iterable[str]) -> dict[str, dict]:
    """Manifest entries of ``names`` (paths relative to ``directory``)."""
    return {name: file_entry(os.path.join(directory, name)) for name in names}


def check_entries(directory: str, entries: Mapping[str, dict], checksums: bool = True) -> list[str]:
    """Problems with the files of ``entries`` (empty when every one matches): missing,
    another size, another SHA-256 (only read when ``checksums``)."""
    problems = []
    for name, expected in entries.items():
        path = os.path.join(directory, name)
        try:
            st = os.stat(path)
        except OSError:
            problems.append(f"{name} is missing")
            continue
        if not stat.S_ISREG(st.st_mode):
            problems.append(f"{name} is not a regular file")
        elif st.st_size != expected["size"]:
            problems.append(f"{name} has {st.st_size} bytes, the manifest says {expected['size']}")
        elif checksums:
            try:
                if file_entry(path)["sha256"] != expected["sha256"]:
                    problems.append(f"{name} does not match its SHA-256 in the manifest")
            except OSError as e:
                problems.append(f"{name} cannot be read ({e.strerror})")
    return problems


def unlisted_files(directory: str, entries: Mapping[str, dict], exempt: Iterable[str]) -> list[str]:
    """Files in ``directory`` that the manifest does not name (apart from ``exempt``)."""
    known = set(entries) | set(exempt)
    return [name for name in list_files(directory) if name not in known]
