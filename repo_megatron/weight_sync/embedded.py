"""``embedded``: the way of an engine in the trainer's rank 0 process (the embedded
transformers engine, the dry run's sink): every stage's sender sends its buckets to rank 0 over
the gloo control plane, in stage order, and rank 0 loads each into the engine
(``update_weights``) as it arrives. It is the strategy of any engine that names none of its own
(:func:`~.streamer.engine_strategy`)."""

from __future__ import annotations

from typing import Optional

from .base import SyncStrategy


class EmbeddedSync(SyncStrategy):
    name = "embedded"

    @classmethod
    def stream(cls, streamer, engine, version: Optional[int] = None) -> None:
        if streamer.rank == 0 and version is None:
            version = engine.weight_version + 1
        streamer.stream_to_rank0(lambda bucket: engine.update_weights(bucket, version))
