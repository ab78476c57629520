"""The weight sync interface: how Hugging Face-named tensors reach the SGLang workers.

One update is planned on the rank that holds the :class:`~..engine.SGLangEngine` (a
:class:`SyncPlan`: workers, their TP sizes, the new version) and carried out by one *sender*
per pipeline stage, each streaming its own stage's buckets (slime's
``update_weight_from_distributed.py``: one sender per PP stage after the TP gather). A
strategy sees one bucket at a time (:func:`~.buckets.iter_buckets`, at most
``weight_bucket_mb``): ``prepare`` and ``push`` run on every sender, ``finish`` once on the
engine's rank after every stage is done, with each sender's :meth:`stage_result`. The sequence
around it (pause, begin/end, flush, version, continue) is :mod:`.session`'s.
"""

from __future__ import annotations

import abc
import asyncio
from dataclasses import dataclass
from typing import Any

import torch

from ..config.rollout import SGLangConfig
from ..engines.sglang.client import SGLangClient

Bucket = list[tuple[str, torch.Tensor]]


@dataclass
class SyncPlan:
    """One update as every sender needs to know it (small and picklable: the engine's rank
    broadcasts it to the senders)."""
    workers: list[str]
    tp_sizes: dict[str, int]
    version: int
    cfg: SGLangConfig
    disk_dir: str = ""      # disk sync: the directory the workers read (set by the engine)


@dataclass
class SyncTarget:
    """The workers of one update as one sender sees them: its HTTP client and its stage."""
    client: SGLangClient
    plan: SyncPlan
    stage: int = 0

    @property
    def workers(self) -> list[str]:
        return self.plan.workers

    def tp_size(self, worker: str) -> int:
        return self.plan.tp_sizes.get(worker, 1)

    async def post_all(self, endpoint: str, body: Any = None) -> list:
        """POST the same body to every worker; fails if any worker fails."""
        return await asyncio.gather(*(self.client.request(w, endpoint, body)
                                      for w in self.workers))


class WeightSyncStrategy(abc.ABC):
    """One way of moving weights; an instance belongs to one sender (one pipeline stage).

    ``in_session``: SGLang with ``/begin_weight_update`` accepts these updates only inside a
    session. ``concurrent_stages``: the stages may push at the same time (else they take
    turns, which keeps SGLang workers, that load one update request at a time, from waiting
    on two senders in opposite orders)."""
    name: str = ""
    in_session: bool = True
    concurrent_stages: bool = False

    def __init__(self, cfg: SGLangConfig, stage: int = 0):
        self.cfg, self.stage = cfg, stage

    async def prepare(self, target: SyncTarget) -> None:
        """On a sender, before its first bucket (e.g. join the stage's process group)."""

    @abc.abstractmethod
    async def push(self, target: SyncTarget, bucket: Bucket) -> None:
        """On a sender: send one bucket to every worker."""

    def stage_result(self) -> Any:
        """On a sender, after its last bucket: what :meth:`finish` needs from this stage."""
        return None

    async def finish(self, target: SyncTarget, stage_results: list) -> None:
        """Once, on the engine's rank, after every stage pushed (e.g. tell the workers to
        load what the stages wrote)."""

    async def close(self, target: SyncTarget) -> None:
        """On a sender at shutdown or when the workers change (e.g. destroy its group)."""
