"""The weight sync interface: how Hugging Face-named tensors reach the SGLang workers.

A strategy sees the tensors one bucket at a time (:func:`~.buckets.iter_buckets`, at most
``weight_bucket_mb`` each) and talks to the workers through a :class:`SyncTarget`; the
sequence around it (pause, begin/end, flush, version, continue) is :mod:`.session`'s.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Callable

import torch

from ...config.rollout import SGLangConfig
from ..client import SGLangClient

Bucket = list[tuple[str, torch.Tensor]]


@dataclass
class SyncTarget:
    """The workers of one update: URLs, their engine TP sizes, and how to reach them."""
    client: SGLangClient
    workers: list[str]
    tp_sizes: dict[str, int]
    post_all: Callable  # async (endpoint, body) -> list of answers, one per worker


class WeightSyncStrategy(abc.ABC):
    """One way of moving weights. ``in_session``: SGLang >= 0.5.22 accepts its updates only
    between ``/begin_weight_update`` and ``/end_weight_update``."""
    name: str = ""
    in_session: bool = True

    def __init__(self, cfg: SGLangConfig):
        self.cfg = cfg

    async def prepare(self, target: SyncTarget) -> None:
        """Before the first bucket of an update (e.g. join a process group)."""

    @abc.abstractmethod
    async def push(self, target: SyncTarget, bucket: Bucket) -> None:
        """Send one bucket to every worker."""

    async def finish(self, target: SyncTarget) -> None:
        """After the last bucket (e.g. tell the workers to load what was written)."""
