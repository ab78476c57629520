"""Per-request seeds: a sample depends on what it is, never on how requests were batched."""

from __future__ import annotations

import hashlib


def request_seed(base_seed: int, *parts: object) -> int:
    """A 63-bit seed from the run seed and the request's identity (step, round, prompt uid,
    kind, index). The same request gets the same seed in eager and lazy schedules."""
    key = "/".join(map(str, (base_seed, *parts))).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1
