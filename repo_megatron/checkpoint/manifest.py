"""A checkpoint's manifest: the size and SHA-256 of every file, recorded at save time from the
files on disk and checked before the checkpoint is trusted (pure file I/O, no torch).

Megatron's ``dist_checkpointing`` validates which shards exist, not what they hold: 1 MB of
garbage in a ``.distcp`` file loads silently as garbage weights. The manifest catches that,
truncated and missing files, and files that were added afterwards.

Hashing a 70B checkpoint with fp32 Adam state reads about 1 TB, so the ranks share it
(:func:`hash_shares`): at save time each rank hashes the files it wrote itself, right after
writing them (from its node's page cache, not over the shared file system), and the rest by
size; on resume the files are split by size. Each rank hashes :data:`HASH_THREADS` files at
once (``hashlib`` and file reads release the GIL).
"""

from __future__ import annotations

import hashlib
import heapq
import os
import re
import stat
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Mapping, Optional, TypeVar

_CHUNK = 8 << 20
HASH_THREADS = 4
# Files whose name says which rank wrote them: torch.distributed.checkpoint's shards
# (``__RANK_N.distcp``, megatron's writer too) and our RNG states (``rng/rank_RANK.pt``).
_WRITTEN_BY = (re.compile(r"__(\d+)_\d+\.distcp$"), re.compile(r"^rng/rank_(\d+)\.pt$"))
_T = TypeVar("_T")
_R = TypeVar("_R")


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


def _in_threads(fn: Callable[[_T], _R], items: list[_T]) -> list[_R]:
    """``[fn(item) for item in items]``, :data:`HASH_THREADS` at a time, in order."""
    if len(items) < 2:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(max_workers=HASH_THREADS) as pool:
        return list(pool.map(fn, items))


def build_entries(directory: str, names: Iterable[str]) -> dict[str, dict]:
    """Manifest entries of ``names`` (paths relative to ``directory``)."""
    names = list(names)
    return dict(zip(names, _in_threads(lambda n: file_entry(os.path.join(directory, n)), names)))


def entry_problem(directory: str, name: str, expected: dict, checksums: bool) -> Optional[str]:
    """What is wrong with file ``name`` against its manifest entry (None if nothing): missing,
    not a regular file, another size, another SHA-256 (only read when ``checksums``)."""
    path = os.path.join(directory, name)
    try:
        st = os.stat(path)
    except OSError:
        return f"{name} is missing"
    if not stat.S_ISREG(st.st_mode):
        return f"{name} is not a regular file"
    if st.st_size != expected["size"]:
        return f"{name} has {st.st_size} bytes, the manifest says {expected['size']}"
    if checksums:
        try:
            if file_entry(path)["sha256"] != expected["sha256"]:
                return f"{name} does not match its SHA-256 in the manifest"
        except OSError as e:
            return f"{name} cannot be read ({e.strerror})"
    return None


def check_entries(directory: str, entries: Mapping[str, dict], checksums: bool = True) -> list[str]:
    """Problems with the files of ``entries``, in their order (empty when every one matches)."""
    found = _in_threads(lambda item: entry_problem(directory, *item, checksums),
                        list(entries.items()))
    return [problem for problem in found if problem is not None]


def writer_rank(name: str) -> Optional[int]:
    """The rank that wrote file ``name``, where its name says (``__3_0.distcp``,
    ``rng/rank_00003.pt``: 3); None for the others (metadata, trainer state)."""
    for pattern in _WRITTEN_BY:
        found = pattern.search(name)
        if found:
            return int(found.group(1))
    return None


def hash_shares(sizes: Mapping[str, int], world: int, own_files: bool) -> list[list[str]]:
    """The files of ``sizes`` (name -> bytes) split over ``world`` ranks for hashing, the same
    on every rank. ``own_files``: each file goes to the rank that wrote it (:func:`writer_rank`,
    when below ``world``); the others go largest first to the rank with the fewest bytes so
    far (ties to the lower rank), so that the last rank to finish has as little as possible."""
    shares: list[list[str]] = [[] for _ in range(world)]
    load = [0] * world
    rest = []
    for name in sorted(sizes):
        rank = writer_rank(name) if own_files else None
        if rank is not None and rank < world:
            shares[rank].append(name)
            load[rank] += sizes[name]
        else:
            rest.append(name)
    heap = [(load[rank], rank) for rank in range(world)]
    heapq.heapify(heap)
    for name in sorted(rest, key=lambda n: (-sizes[n], n)):
        bytes_so_far, rank = heapq.heappop(heap)
        shares[rank].append(name)
        heapq.heappush(heap, (bytes_so_far + sizes[name], rank))
    return shares


def unlisted_files(directory: str, entries: Mapping[str, dict], exempt: Iterable[str]) -> list[str]:
    """Files in ``directory`` that the manifest does not name (apart from ``exempt``)."""
    known = set(entries) | set(exempt)
    return [name for name in list_files(directory) if name not in known]
