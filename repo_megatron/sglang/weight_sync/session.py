"""The sequence of one weight update, chosen by the workers' SGLang version:

    /pause_generation                      (a cache flush fails while requests run)
    /begin_weight_update                   (SGLang >= 0.5.22, tensor and distributed only)
    strategy: prepare, push(bucket)..., finish
    /end_weight_update                     (SGLang >= 0.5.22)
    /flush_cache, /update_weight_version
    /continue_generation                   (always, even after a failure)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

import torch

from .base import SyncTarget
from .buckets import iter_buckets

if TYPE_CHECKING:
    from ..engine import SGLangEngine


def sync_weights(engine: "SGLangEngine", named_tensors: Iterable[tuple[str, torch.Tensor]],
                 version: int) -> None:
    """Push ``named_tensors`` to every worker of ``engine`` and set their weight version.
    The tensors are iterated here, in the caller's thread, one bucket at a time."""
    strategy = engine.strategy
    workers = engine.run(engine.workers())
    target = SyncTarget(engine.client, workers, engine.tp_sizes,
                        lambda endpoint, body=None: engine.post_all(endpoint, body, workers))
    session = strategy.in_session and engine.needs_weight_update_session
    engine.run(target.post_all("/pause_generation", {}))
    try:
        if session:
            engine.run(target.post_all("/begin_weight_update", {}))
        engine.run(strategy.prepare(target))
        for bucket in iter_buckets(named_tensors, engine.cfg.weight_bucket_mb << 20):
            engine.run(strategy.push(target, bucket))
        engine.run(strategy.finish(target))
        if session:
            engine.run(target.post_all("/end_weight_update", {}))
        engine.run(target.post_all("/flush_cache"))
        engine.run(target.post_all("/update_weight_version", {"new_version": str(version)}))
    finally:
        engine.run(target.post_all("/continue_generation", {}))
