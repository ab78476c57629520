"""Benchmark: how fast one rank hashes its share of a checkpoint's manifest (SHA-256).

Writes ``--files`` files of ``--file-mb`` MB of random bytes (a rank's share: torch_dist writes
two shards per rank), then, ``--repeats`` times, reads them in three ways, each with the files
in the page cache (right after writing: what a rank hashes at save time) and out of it
(``posix_fadvise(DONTNEED)`` per file, no root needed: what a resume reads):

- ``read``: the bytes read, nothing hashed (the floor of the disk or the page cache);
- ``sha256_1_thread``: :func:`~repo_megatron.checkpoint.manifest.file_entry` file after file;
- ``sha256_pool``: :func:`~repo_megatron.checkpoint.manifest.build_entries`, which hashes
  ``HASH_THREADS`` files at once (what the checkpoint manager runs).

Ends with one JSON line of GB/s (median of the repeats, and every repeat).

    python benchmarks/checkpoint_hash.py [--workdir DIR] [--files 4] [--file-mb 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

from repo_megatron.checkpoint.manifest import HASH_THREADS, _CHUNK, build_entries, file_entry


def write_files(directory: str, files: int, size: int) -> list[str]:
    names = []
    for i in range(files):
        name = f"__{i}_0.distcp"
        with open(os.path.join(directory, name), "wb") as f:
            for _ in range(size // _CHUNK):
                f.write(os.urandom(_CHUNK))
            f.flush()
            os.fsync(f.fileno())
        names.append(name)
    return names


def evict(path: str) -> None:
    """Drop the file's pages from the page cache (they are clean: written and fsynced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_all(path: str) -> None:
    with open(path, "rb") as f:
        while f.read(_CHUNK):
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--file-mb", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    size = args.file_mb << 20
    ways = {
        "read": lambda d, names: [read_all(os.path.join(d, n)) for n in names],
        "sha256_1_thread": lambda d, names: [file_entry(os.path.join(d, n)) for n in names],
        "sha256_pool": build_entries,
    }
    rates: dict[str, list[float]] = {f"{way}_{cache}": [] for way in ways
                                     for cache in ("cached", "cold")}
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="bench-hash-") as d:
        names = write_files(d, args.files, size)
        total = args.files * size
        for _ in range(args.repeats):
            for way, run in ways.items():
                for cache in ("cached", "cold"):
                    for name in names:
                        if cache == "cold":
                            evict(os.path.join(d, name))
                        else:
                            read_all(os.path.join(d, name))
                    t0 = time.perf_counter()
                    run(d, names)
                    rates[f"{way}_{cache}"].append(total / (time.perf_counter() - t0) / 1e9)
    for key, values in rates.items():
        print(f"{key:24s} {statistics.median(values):6.2f} GB/s  "
              f"({', '.join(f'{v:.2f}' for v in values)})")
    print(json.dumps({"benchmark": "checkpoint_hash", "files": args.files,
                      "file_mb": args.file_mb, "hash_threads": HASH_THREADS,
                      "cpus": os.cpu_count(),
                      "median_gb_per_s": {k: round(statistics.median(v), 3)
                                          for k, v in rates.items()},
                      "gb_per_s": {k: [round(x, 3) for x in v] for k, v in rates.items()}}))


if __name__ == "__main__":
    main()
