"""``tensor`` (colocated): ``/update_weights_from_tensor`` with flattened buckets (slime's
``update_weight_from_tensor.py``). ``serialized_named_tensors`` holds one entry per engine TP
rank and TP rank i reads entry i: on GPUs entry i must be made by the trainer process on the
GPU of that rank, so each such process serialises its own copy of the bucket (CUDA-IPC
handles, see :mod:`.flattened_bucket`) and the engine's first rank posts them together
(:meth:`TensorStrategy.stream_stages`: trainer rank ``e * tp + i`` shares a GPU with TP rank
``i`` of engine ``e``, the engine on that group's node (:mod:`.node_binding`, never the
router's list order); every rank gets every bucket, its stage gathers it and the other stages
receive it over the pipeline group). One process alone (:meth:`TensorStrategy.push`) can
serve engines of TP 1, or any TP with CPU tensors, which travel by value."""

from __future__ import annotations

import asyncio
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from ..engines.sglang.protocol import tensor_update_body
from ..runtime import control, cpu_compat
from .base import SyncPlan, SyncTarget, WeightSyncStrategy
from .buckets import END, Bucket
from .flattened_bucket import bucket_payloads
from .node_binding import bind_engines, node_names


class TensorStrategy(WeightSyncStrategy):
    name = "tensor"

    async def push(self, target: SyncTarget, bucket: Bucket) -> None:
        """Every worker gets this process's payloads, once per engine TP rank."""
        on_gpu = bool(bucket) and bucket[0][1].device.type != "cpu"
        wide = [w for w in target.workers if target.tp_size(w) > 1]
        if on_gpu and wide:
            raise RuntimeError(f"weight_sync=tensor: {wide[0]} runs TP "
                               f"{target.tp_size(wide[0])}; its TP rank i must read CUDA-IPC "
                               f"handles made on its own GPU, so one trainer process per "
                               f"engine GPU has to serialise (the Megatron session does)")
        for payload in bucket_payloads(bucket):
            await asyncio.gather(*(self.post(target, worker, [payload] * target.tp_size(worker))
                                   for worker in target.workers))

    async def post(self, target: SyncTarget, worker: str, entries: list[str]) -> None:
        """One flattened bucket to ``worker``: ``entries[i]`` for its TP rank i."""
        await target.client.request(worker, "/update_weights_from_tensor",
                                    tensor_update_body(entries))

    # ---- the trainer side: colocated ----------------------------------------------------------
    @classmethod
    def stream_stages(cls, streamer, plan: SyncPlan, engine) -> list:
        """Every rank serialises every bucket for its engine TP rank; each engine's first rank
        posts the entries of its ``tp`` ranks in rank order. The stages take turns."""
        tp = engine_tp_size(plan)
        rank = streamer.rank
        index, first = rank // tp, rank // tp * tp
        # every rank creates every engine's group
        group = streamer.gloo_groups([list(range(e * tp, (e + 1) * tp))
                                      for e in range(len(plan.workers))])[index]
        worker = node_bound_workers(plan, tp)[index]
        poster = streamer.stage_sender(plan.cfg, engine) if rank == first else None
        error = None
        for stage in range(streamer.stages):
            buckets = streamer.stage_buckets() if streamer.stage == stage else None
            while (bucket := stage_bucket(streamer, buckets, stage)) is not END:
                payloads = bucket_payloads(bucket)
                entries = [None] * tp if rank == first else None
                dist.gather_object(payloads, entries, dst=first, group=group)
                if poster is not None and error is None:
                    try:
                        for i in range(len(payloads)):
                            poster.loop.run(poster.strategy.post(
                                poster.target(plan), worker, [entry[i] for entry in entries]))
                    except Exception as e:
                        error = f"engine {worker} (rank {rank}): {type(e).__name__}: {e}"
                # the engine has loaded: every rank's CUDA-IPC memory may go now
                dist.barrier(group=group)
                del bucket, payloads
        streamer.raise_failures(error)
        return []


def engine_tp_size(plan: SyncPlan) -> int:
    """The engines' TP size, after checking that trainer rank ``e * tp + i`` can be TP rank
    ``i`` of engine ``e`` (the same check, with the same answer, on every rank)."""
    sizes = {plan.tp_sizes[w] for w in plan.workers}
    world = dist.get_world_size()
    if len(sizes) != 1 or len(plan.workers) * next(iter(sizes)) != world:
        raise RuntimeError(
            f"weight_sync=tensor is the colocated layout: the {world} trainer ranks must be "
            f"the engines' GPUs, one engine TP rank each, but the workers have TP sizes "
            f"{[plan.tp_sizes[w] for w in plan.workers]}; use weight_sync=distributed")
    return sizes.pop()


def node_bound_workers(plan: SyncPlan, tp: int) -> list[str]:
    """Engine ``e``'s worker: the one on the node of trainer ranks ``e*tp .. e*tp+tp-1``
    (:func:`.node_binding.bind_engines`; the same answer on every rank)."""
    nodes = control.all_gather_object(node_names())
    groups = [nodes[e * tp:(e + 1) * tp] for e in range(len(plan.workers))]
    for e, group in enumerate(groups):
        if len(set(group)) > 1:
            raise RuntimeError(f"weight_sync=tensor: trainer ranks {e * tp}..{(e + 1) * tp - 1}"
                               f" (one engine's TP group) span several nodes; place "
                               f"{tp} consecutive ranks per node")
    return bind_engines(plan.workers, [group[0] for group in groups], nodes[0])


def stage_bucket(streamer, buckets: Optional[Iterator[Bucket]], stage: int):
    """The next bucket of ``stage`` on every rank (END after its last): the stage's ranks
    gather it, the other stages receive it over the pipeline group."""
    bucket = next(buckets, END) if buckets is not None else END
    if streamer.stages == 1:
        return bucket
    group = streamer.ps.get_pipeline_model_parallel_group()
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
