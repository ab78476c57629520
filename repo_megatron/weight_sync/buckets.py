"""Grouping a stream of named tensors into buckets of bounded size."""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

Bucket = list[tuple[str, torch.Tensor]]

END = None  # what ends a stage's stream of buckets (a header, or the next bucket)


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def bucket_bytes(bucket: Bucket) -> int:
    return sum(tensor_bytes(t) for _, t in bucket)


def iter_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]],
                 max_bytes: int) -> Iterator[Bucket]:
    """Consecutive runs of ``named_tensors`` of at most ``max_bytes`` each, in order; a
    tensor larger than ``max_bytes`` travels alone. Lazy: a converter that gathers shards on
    the fly only holds one bucket at a time."""
    bucket: Bucket = []
    size = 0
    for name, tensor in named_tensors:
        nbytes = tensor_bytes(tensor)
        if bucket and size + nbytes > max_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def drain(buckets: Iterator[Bucket]) -> None:
    """Take part in the gathers of a stage without keeping what they produce."""
    for _ in buckets:
        pass
