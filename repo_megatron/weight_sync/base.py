"""The weight sync interface: how a strategy brings the trainer's weights to a rollout engine.

A strategy is one class in one file, with both of its sides:

- the *trainer side*, :meth:`SyncStrategy.stream`, which every trainer rank runs for one
  update (a collective): how the pipeline stages stream their buckets for this kind of engine.
  Its tools are the rank's :class:`~.streamer.WeightStreamer` (the stage's buckets, the gloo
  control plane, the stream of every stage to rank 0). The engine says which strategy it takes
  (``weight_sync_strategy``, :mod:`repo_megatron.engines.base`): the embedded engine's is
  :class:`~.embedded.EmbeddedSync`, an SGLang engine's the ``rollout.sglang.weight_sync`` one;
- for SGLang servers (:class:`WeightSyncStrategy`), the *sender side*. One update is planned
  on the rank that holds the :class:`~repo_megatron.engines.sglang.engine.SGLangEngine` (a
  :class:`SyncPlan`: workers, their TP sizes, the new version) and carried out by one sender
  per pipeline stage, each streaming its own stage's buckets (slime's
  ``update_weight_from_distributed.py``: one sender per PP stage after the TP gather). The
  strategy sees one bucket at a time (:func:`~.buckets.iter_buckets`, at most
  ``weight_bucket_mb``): ``prepare`` and ``push`` run on every sender, ``finish`` once on the
  engine's rank after every stage is done, with each sender's :meth:`stage_result`. The
  sequence around it (pause, begin/end, flush, version, continue) is :mod:`.session`'s.
"""

from __future__ import annotations

import abc
import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Optional

from ..config.rollout import SGLangConfig
from ..engines.sglang.client import SGLangClient
from ..runtime import control
from .buckets import Bucket, drain

log = logging.getLogger(__name__)


class SyncStrategy(abc.ABC):
    """A way of bringing the trainer's weights to one kind of rollout engine."""
    name: str = ""

    @classmethod
    @abc.abstractmethod
    def stream(cls, streamer, engine, version: Optional[int]) -> None:
        """On every trainer rank (a collective): the weights of every pipeline stage into
        ``engine`` (rank 0's; None on the other ranks) as weight ``version`` (None: the
        engine's next). ``streamer``: this rank's :class:`~.streamer.WeightStreamer`."""


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


class WeightSyncStrategy(SyncStrategy):
    """One way of moving weights to SGLang workers; an instance belongs to one sender (one
    pipeline stage).

    ``in_session``: SGLang with ``/begin_weight_update`` accepts these updates only inside a
    session. ``concurrent_stages``: the stages may push at the same time (else they take
    turns, which keeps SGLang workers, that load one update request at a time, from waiting
    on two senders in opposite orders). ``uses_disk_dir``: the senders write files the
    workers read, in the plan's ``disk_dir`` (a temporary directory when
    ``rollout.sglang.disk_dir`` is empty)."""
    in_session: bool = True
    concurrent_stages: bool = False
    uses_disk_dir: bool = False

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

    # ---- the trainer side ---------------------------------------------------------------------
    @classmethod
    def stream(cls, streamer, engine, version: Optional[int] = None) -> None:
        """Plan on rank 0 (the engine's ``begin_update``: pause, sessions), the stages' buckets
        to the workers (:meth:`stream_stages`), finish on rank 0 (index, flush, version,
        continue)."""
        update, plan, error = None, None, None
        if streamer.rank == 0:
            try:
                update = engine.begin_update(version).__enter__()
                plan = update.plan
            except Exception as e:          # every rank must leave the collective with it
                error = f"{type(e).__name__}: {e}"
        plan, error = control.broadcast_object((plan, error))
        if error:
            raise RuntimeError(f"weight sync failed: {error}")
        try:
            results = cls.stream_stages(streamer, plan, engine)
        except BaseException as e:
            if update is not None:
                update.__exit__(type(e), e, e.__traceback__)
            raise
        if update is not None:
            update.stage_results.extend(results)
            update.__exit__(None, None, None)

    @classmethod
    def stream_stages(cls, streamer, plan: SyncPlan, engine) -> list:
        """Each stage's sender pushes its buckets (all stages at once with
        ``concurrent_stages``, else one stage at a time); returns the stages' results on
        rank 0 (after raising any sender's failure on every rank)."""
        result, error = None, None
        pushes = streamer.ps.get_data_parallel_rank() == 0
        if cls.concurrent_stages:
            if pushes:
                result, error = cls.push_stage(streamer, plan, engine)
        else:
            for stage in range(streamer.stages):              # one stage at a time
                if pushes and streamer.stage == stage:
                    result, error = cls.push_stage(streamer, plan, engine)
                control.barrier()
        streamer.raise_failures(error)
        results = control.all_gather_object(result if streamer.is_sender else None)
        return [r for r in results if r is not None]

    @classmethod
    def push_stage(cls, streamer, plan: SyncPlan, engine) -> tuple[Any, Optional[str]]:
        """(stage result, error) of this rank's part of its stage: the sender pushes, its TP
        peers only gather. A failed push keeps draining so the peers are not left waiting."""
        buckets = streamer.stage_buckets()
        if not streamer.is_sender:
            drain(buckets)
            return None, None
        try:
            return streamer.stage_sender(plan.cfg, engine).send(plan, buckets), None
        except Exception as e:
            log.error("pipeline stage %d could not push its weights: %s", streamer.stage, e)
            drain(buckets)
            return None, (f"stage {streamer.stage} (rank {streamer.rank}): "
                          f"{type(e).__name__}: {e}")
