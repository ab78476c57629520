"""Weight sync, Megatron side: every pipeline stage streams its own weights, bucket by bucket.

Each stage's TP group gathers one parameter at a time and maps it to Hugging Face names
(:class:`repo_megatron.weight_sync.plan.HFExport`, the converters' mapping); the
stage's *sender* (DP rank 0, TP rank 0) groups the tensors into buckets of at most
``rollout.sglang.weight_bucket_mb`` and sends each as soon as it is full (slime's
``update_weight_from_distributed.py``: one sender per stage after the TP gather). No rank holds
more than its own shards plus a bounded number of buckets. Where the buckets go:

- **embedded engine** (rank 0's transformers model): the other stages' senders send their
  buckets to rank 0 over gloo, which loads each into the model as it arrives;
- **SGLang, disk / distributed**: rank 0 plans the update (:meth:`SGLangEngine.begin_update`:
  pause, sessions) and every stage's sender pushes to the workers itself
  (:class:`~repo_megatron.weight_sync.sender.StageSender`: its own safetensors shards,
  its own process group); rank 0 finishes (index, flush, version, continue);
- **SGLang, tensor** (colocated): trainer rank ``e * tp + i`` shares a GPU with TP rank ``i`` of
  engine ``e``. Every rank gets every bucket (its stage gathers it, the other stages receive it
  over the pipeline group), serialises its own copy (CUDA-IPC handles on GPUs) and the engine's
  first rank posts the ``tp`` entries together, entry ``i`` from rank ``e * tp + i``.

Stages take turns except where their writes are independent (disk), so an SGLang worker, which
loads one update request at a time, never waits on two senders in opposite orders; a failing
sender keeps draining its stage (its TP peers are inside the gathers) and the failure is raised
on every rank afterwards. Small objects travel on the gloo control plane
(:mod:`repo_megatron.runtime.control`), never inside a GPU collective.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist

from ..config.rollout import SGLangConfig
from .plan import HFExport
from ..models.architecture import Architecture
from ..runtime import control
from .base import Bucket, SyncPlan
from .buckets import iter_buckets

log = logging.getLogger(__name__)

END = None  # header that ends a stage's stream


def drain(buckets: Iterator[Bucket]) -> None:
    """Take part in the gathers of a stage without keeping what they produce."""
    for _ in buckets:
        pass


class WeightStreamer:
    """The per-rank side of weight sync; the :class:`~.session.Session` of every rank holds
    one and calls :meth:`sync` on every rank (a collective)."""

    def __init__(self, model_chunks: list, arch: Architecture, cfg: SGLangConfig):
        from megatron.core import parallel_state as ps

        self.chunks, self.arch, self.cfg, self.ps = model_chunks, arch, cfg, ps
        self.bucket_bytes = cfg.weight_bucket_mb << 20
        self.rank = dist.get_rank()
        self.stage = ps.get_pipeline_model_parallel_rank()
        self.stages = ps.get_pipeline_model_parallel_world_size()
        self.is_sender = ps.get_data_parallel_rank() == 0 and ps.get_tensor_model_parallel_rank() == 0
        # Headers, bucket bytes to rank 0 and the waits for rank 0's engine go over the control
        # plane: gloo, with parallel.control_timeout_minutes (an engine update can take longer
        # than a collective of the default group may wait).
        self.group = control.group()
        # pipeline stage -> global rank of its sender
        self.sender_ranks = dict(filter(None, self._all_gather(
            (self.stage, self.rank) if self.is_sender else None)))
        self.sender = None            # this rank's StageSender (SGLang), made at first use
        self.engine_groups = None     # tensor sync: one gloo group per colocated engine
        self.export: Optional[HFExport] = None    # parameter -> HF names plan, at first use

    def stage_buckets(self) -> Iterator[Bucket]:
        """This stage's weights as HF-named buckets of at most ``weight_bucket_mb``, in order.
        Collective over the TP group: every TP rank of the stage must iterate it to the end.
        The plan is read from the sharded state dicts once and kept while the chunks hold the
        same parameters."""
        if self.export is None or not self.export.describes(self.chunks):
            self.export = HFExport(self.chunks, self.arch)
        return iter_buckets(self.export.named_tensors(), self.bucket_bytes)

    # ---- control plane ------------------------------------------------------------------------
    def _broadcast(self, obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def _all_gather(self, obj) -> list:
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def _raise_failures(self, error: Optional[str]) -> None:
        failures = [e for e in self._all_gather(error) if e]
        if failures:
            raise RuntimeError(f"weight sync failed: {failures[0]}")

    # ---- entry point --------------------------------------------------------------------------
    def sync(self, engine=None, version: Optional[int] = None) -> None:
        """Megatron's weights -> ``engine`` (rank 0's rollout engine; None elsewhere, and on
        rank 0 of a run without rollouts) as weight ``version`` (default: the engine's next).
        Collective over every rank."""
        from ..engines.sglang.engine import SGLangEngine

        kind = None if engine is None else ("sglang" if isinstance(engine, SGLangEngine)
                                            else "embedded")
        kind = self._broadcast(kind)
        if kind == "embedded":
            if self.rank == 0 and version is None:
                version = engine.weight_version + 1
            self.stream_to_rank0(lambda bucket: engine.update_weights(bucket, version))
        elif kind == "sglang":
            self.sync_sglang(engine, version)
        dist.barrier(group=self.group)

    def close(self) -> None:
        """Destroy what this rank's sender holds (its update process group)."""
        if self.sender is not None:
            self.sender.close()
            self.sender = None

    # ---- embedded engine: stages -> rank 0 ----------------------------------------------------
    def stream_to_rank0(self, sink: Callable[[Bucket], None]) -> None:
        """Every stage's buckets, in stage order, into ``sink`` on rank 0 (collective)."""
        if self.ps.get_data_parallel_rank() != 0:
            return
        buckets = self.stage_buckets()
        if self.rank == 0:
            for bucket in buckets:
                sink(bucket)
                del bucket
            for stage in range(1, self.stages):
                src = self.sender_ranks[stage]
                while (bucket := self._recv_bucket(src)) is not None:
                    sink(bucket)
                    del bucket
        elif self.is_sender:
            for bucket in buckets:
                self._send_bucket(bucket, 0)
                del bucket
            dist.send_object_list([END], dst=0, group=self.group)
        else:
            drain(buckets)

    def _send_bucket(self, bucket: Bucket, dst: int) -> None:
        dist.send_object_list([[(n, tuple(t.shape), t.dtype) for n, t in bucket]], dst=dst,
                              group=self.group)
        for _, tensor in bucket:     # gloo moves bytes: CPU, contiguous, any dtype as uint8
            dist.send(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8), dst,
                      group=self.group)

    def _recv_bucket(self, src: int) -> Optional[Bucket]:
        box = [None]
        dist.recv_object_list(box, src=src, group=self.group)
        if box[0] is END:
            return None
        bucket = []
        for name, shape, dtype in box[0]:
            tensor = torch.empty(shape, dtype=dtype)
            dist.recv(tensor.reshape(-1).view(torch.uint8), src, group=self.group)
            bucket.append((name, tensor))
        return bucket

    # ---- SGLang -------------------------------------------------------------------------------
    def _stage_sender(self, cfg: SGLangConfig, engine):
        from .sender import StageSender

        if self.sender is None:
            self.sender = engine.sender if self.rank == 0 else StageSender(cfg, self.stage)
        return self.sender

    def sync_sglang(self, engine, version: Optional[int] = None) -> None:
        """Plan on rank 0, stream from the stages, finish on rank 0."""
        update, plan, error = None, None, None
        if self.rank == 0:
            try:
                update = engine.begin_update(version).__enter__()
                plan = update.plan
            except Exception as e:          # every rank must leave the collective with it
                error = f"{type(e).__name__}: {e}"
        plan, error = self._broadcast((plan, error))
        if error:
            raise RuntimeError(f"weight sync failed: {error}")
        try:
            if plan.cfg.weight_sync == "tensor":
                self.stream_colocated(plan, engine)
                results = []
            else:
                results = self.stream_from_senders(plan, engine)
        except BaseException as e:
            if update is not None:
                update.__exit__(type(e), e, e.__traceback__)
            raise
        if update is not None:
            update.stage_results.extend(results)
            update.__exit__(None, None, None)

    def stream_from_senders(self, plan: SyncPlan, engine) -> list:
        """disk / distributed: each stage's sender pushes its buckets; returns the stages'
        results on rank 0 (after raising any sender's failure on every rank)."""
        from .registry import STRATEGIES

        result, error = None, None
        pushes = self.ps.get_data_parallel_rank() == 0
        if STRATEGIES.get(plan.cfg.weight_sync).concurrent_stages:
            if pushes:
                result, error = self._push_stage(plan, engine)
        else:
            for stage in range(self.stages):              # one stage at a time
                if pushes and self.stage == stage:
                    result, error = self._push_stage(plan, engine)
                dist.barrier(group=self.group)
        self._raise_failures(error)
        results = self._all_gather(result if self.is_sender else None)
        return [r for r in results if r is not None]

    def _push_stage(self, plan: SyncPlan, engine):
        """(stage result, error) of this rank's part of its stage: the sender pushes, its TP
        peers only gather. A failed push keeps draining so the peers are not left waiting."""
        buckets = self.stage_buckets()
        if not self.is_sender:
            drain(buckets)
            return None, None
        try:
            return self._stage_sender(plan.cfg, engine).send(plan, buckets), None
        except Exception as e:
            log.error("pipeline stage %d could not push its weights: %s", self.stage, e)
            drain(buckets)
            return None, f"stage {self.stage} (rank {self.rank}): {type(e).__name__}: {e}"

    # ---- SGLang, colocated (tensor) -----------------------------------------------------------
    def _engine_layout(self, plan: SyncPlan) -> int:
        """The engines' TP size, after checking that trainer rank ``e * tp + i`` can be TP rank
        ``i`` of engine ``e`` (the same check, with the same answer, on every rank)."""
        sizes = {plan.tp_sizes[w] for w in plan.workers}
        world = dist.get_world_size()
        if len(sizes) != 1 or len(plan.workers) * next(iter(sizes)) != world:
            raise RuntimeError(
                f"weight_sync=tensor is the colocated layout: the {world} trainer ranks must be "
                f"the engines' GPUs, one engine TP rank each, but the workers have TP sizes "
                f"{[plan.tp_sizes[w] for w in plan.workers]}; use weight_sync=distributed")
        tp = sizes.pop()
        if self.engine_groups is None:                 # every rank creates every group
            self.engine_groups = [dist.new_group(list(range(e * tp, (e + 1) * tp)),
                                                 backend="gloo")
                                  for e in range(len(plan.workers))]
        return tp

    def stream_colocated(self, plan: SyncPlan, engine) -> None:
        """Every rank serialises every bucket for its engine TP rank; each engine's first rank
        posts the entries of its ``tp`` ranks in rank order."""
        from .flattened_bucket import bucket_payloads

        tp = self._engine_layout(plan)
        index, first = self.rank // tp, self.rank // tp * tp
        group, worker = self.engine_groups[index], plan.workers[index]
        poster = self._stage_sender(plan.cfg, engine) if self.rank == first else None
        error = None
        for stage in range(self.stages):
            buckets = (self.stage_buckets()
                       if self.stage == stage else None)
            while (bucket := self._stage_bucket(buckets, stage)) is not END:
                payloads = bucket_payloads(bucket)
                entries = [None] * tp if self.rank == first else None
                dist.gather_object(payloads, entries, dst=first, group=group)
                if poster is not None and error is None:
                    try:
                        for i in range(len(payloads)):
                            poster.loop.run(poster.strategy.post(
                                poster.target(plan), worker, [rank[i] for rank in entries]))
                    except Exception as e:
                        error = f"engine {worker} (rank {self.rank}): {type(e).__name__}: {e}"
                # the engine has loaded: every rank's CUDA-IPC memory may go now
                dist.barrier(group=group)
                del bucket, payloads
        self._raise_failures(error)

    def _stage_bucket(self, buckets: Optional[Iterator[Bucket]], stage: int):
        """The next bucket of ``stage`` on every rank (END after its last): the stage's ranks
        gather it, the other stages receive it over the pipeline group."""
        from ..runtime import cpu_compat

        bucket = next(buckets, END) if buckets is not None else END
        if self.stages == 1:
            return bucket
        group = self.ps.get_pipeline_model_parallel_group()
        src = dist.get_global_rank(group, stage)
        header = [None if bucket is END else [(n, tuple(t.shape), t.dtype) for n, t in bucket]]
        dist.broadcast_object_list(header, src=src, group=group)
        if header[0] is END:
            return END
        if buckets is None:
            bucket = [(n, torch.empty(shape, dtype=dtype, device=cpu_compat.device()))
                      for n, shape, dtype in header[0]]
        else:
            bucket = [(n, t.contiguous()) for n, t in bucket]
        for _, tensor in bucket:
            dist.broadcast(tensor, src, group=group)
        return bucket


def gather_hf_weights(streamer: WeightStreamer) -> Optional[dict[str, torch.Tensor]]:
    """Every parameter as a full HF-named CPU tensor on global rank 0 (None elsewhere), for
    an export. Collective over every rank."""
    weights: dict[str, torch.Tensor] = {}
    streamer.stream_to_rank0(lambda bucket: weights.update(
        (name, t.detach().to("cpu", copy=True)) for name, t in bucket))
    return weights if streamer.rank == 0 else None
