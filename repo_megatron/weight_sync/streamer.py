"""Weight sync, Megatron side: every pipeline stage streams its own weights, bucket by bucket.

Each stage's TP group gathers one parameter at a time and maps it to Hugging Face names
(:class:`~.plan.HFExport`, the converters' mapping); the stage's *sender* (DP rank 0, TP
rank 0) groups the tensors into buckets of at most ``rollout.sglang.weight_bucket_mb``
(:meth:`WeightStreamer.stage_buckets`). No rank holds more than its own shards plus a bounded
number of buckets. Where the buckets go is the engine's strategy's business (one file each,
:mod:`.base`): :meth:`WeightStreamer.sync` asks rank 0's engine which strategy it takes,
tells every rank, and runs that strategy's trainer side with this streamer's tools:

- the stage's buckets and its sender (:meth:`~WeightStreamer.stage_buckets`,
  :meth:`~WeightStreamer.stage_sender`);
- every stage's buckets to rank 0, in stage order (:meth:`~WeightStreamer.stream_to_rank0`:
  the embedded engine, the HF export);
- the gloo control plane (:mod:`repo_megatron.runtime.control`, with
  ``parallel.control_timeout_minutes``): broadcasts, failures raised on every rank, barriers,
  and gloo groups made once per layout. Small objects and the waits for rank 0's engine
  travel there, never inside a GPU collective.

A failing sender keeps draining its stage (its TP peers are inside the gathers) and the failure
is raised on every rank afterwards.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist

from ..config.rollout import SGLangConfig
from ..models.architecture import Architecture
from ..runtime import control
from .base import SyncStrategy
from .buckets import END, Bucket, drain, iter_buckets
from .embedded import EmbeddedSync
from .plan import HFExport


def engine_strategy(engine) -> type[SyncStrategy]:
    """The strategy that brings the weights to ``engine``: the one it names
    (``weight_sync_strategy``: an SGLang engine's ``rollout.sglang.weight_sync``), else the
    embedded way (Hugging Face-named tensors into its ``update_weights`` on rank 0)."""
    return getattr(engine, "weight_sync_strategy", None) or EmbeddedSync


class WeightStreamer:
    """The per-rank side of weight sync; the :class:`~repo_megatron.run.session.Session` of
    every rank holds one and calls :meth:`sync` on every rank (a collective)."""

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
        self.sender_ranks = dict(filter(None, control.all_gather_object(
            (self.stage, self.rank) if self.is_sender else None)))
        self.sender = None            # this rank's StageSender (SGLang), made at first use
        self.groups: dict[tuple, list] = {}       # gloo groups by their members
        self.export: Optional[HFExport] = None    # parameter -> HF names plan, at first use

    def stage_buckets(self) -> Iterator[Bucket]:
        """This stage's weights as HF-named buckets of at most ``weight_bucket_mb``, in order.
        Collective over the TP group: every TP rank of the stage must iterate it to the end.
        The plan is read from the sharded state dicts once and kept while the chunks hold the
        same parameters."""
        if self.export is None or not self.export.describes(self.chunks):
            self.export = HFExport(self.chunks, self.arch)
        return iter_buckets(self.export.named_tensors(), self.bucket_bytes)

    # ---- control plane (runtime/control.py) --------------------------------------------------
    @staticmethod
    def raise_failures(error: Optional[str]) -> None:
        """Raise the first rank's ``error`` on every rank, if any rank has one (collective)."""
        problem = control.first_problem(error)
        if problem is not None:
            raise RuntimeError(f"weight sync failed: {problem}")

    def gloo_groups(self, members: list[list[int]]) -> list:
        """One gloo group per list of global ranks in ``members``, made the first time this
        layout is asked for (every rank must ask: every rank creates every group)."""
        key = tuple(map(tuple, members))
        if key not in self.groups:
            self.groups[key] = [dist.new_group(ranks, backend="gloo") for ranks in members]
        return self.groups[key]

    # ---- entry point --------------------------------------------------------------------------
    def sync(self, engine=None, version: Optional[int] = None) -> None:
        """Megatron's weights -> ``engine`` (rank 0's rollout engine; None elsewhere, and on
        rank 0 of a run without rollouts) as weight ``version`` (default: the engine's next),
        with the strategy the engine takes. Collective over every rank."""
        # a class travels as its module and name: every rank imports the same strategy
        strategy = control.broadcast_object(None if engine is None else engine_strategy(engine))
        if strategy is not None:
            strategy.stream(self, engine, version)
        control.barrier()

    def close(self) -> None:
        """Destroy what this rank's sender holds (its update process group)."""
        if self.sender is not None:
            self.sender.close()
            self.sender = None

    # ---- stages -> rank 0 ---------------------------------------------------------------------
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
                while (bucket := self._recv_bucket(src)) is not END:
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
            return END
        bucket = []
        for name, shape, dtype in box[0]:
            tensor = torch.empty(shape, dtype=dtype)
            dist.recv(tensor.reshape(-1).view(torch.uint8), src, group=self.group)
            bucket.append((name, tensor))
        return bucket

    # ---- senders that push from every stage ---------------------------------------------------
    def stage_sender(self, cfg: SGLangConfig, engine):
        """This rank's sender of its stage, made at first use: on rank 0 the engine's own
        (it shares the engine's loop and HTTP client), elsewhere one of its own."""
        from .sender import StageSender

        if self.sender is None:
            self.sender = engine.sender if self.rank == 0 else StageSender(cfg, self.stage)
        return self.sender


def gather_hf_weights(streamer: WeightStreamer) -> Optional[dict[str, torch.Tensor]]:
    """Every parameter as a full HF-named CPU tensor on global rank 0 (None elsewhere), for
    an export. Collective over every rank."""
    weights: dict[str, torch.Tensor] = {}
    streamer.stream_to_rank0(lambda bucket: weights.update(
        (name, t.detach().to("cpu", copy=True)) for name, t in bucket))
    return weights if streamer.rank == 0 else None
