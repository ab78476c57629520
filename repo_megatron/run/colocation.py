"""Colocated runs: who holds the GPU in each phase of the step.

In a colocated run (``rollout.sglang.weight_sync: tensor``) SGLang and Megatron share every GPU
and take turns. The session enters a phase before it runs it:

    phase                          trainer (every rank)       SGLang engines (rank 0 asks)
    start-up (Session.__init__)    not built yet              released before any rank
                                                              builds the trainer
    rollout, evaluate              offloaded                  weights, KV cache, CUDA graphs
                                                              (resumed by the first generation)
    prepare, update, save, export  resident                   released: kv_cache, weights,
                                                              cuda_graph
    weight sync                    resident                   weights resumed first, pushed;
                                                              the rest stays released

Going to the rollout, every rank offloads its trainer (``rollout.sglang.offload_trainer``,
:mod:`repo_megatron.trainer.offload`), then the ranks meet on the control plane, so no engine
takes its memory back before every trainer rank on its GPUs has let go. Going to training, rank
0 asks the engines to release (they are idle: the rollout has ended), the ranks meet, then each
restores its trainer. With the trainer offloaded, SGLang's KV cache comes back at the next
generation rather than at the end of the weight update, when the trainer still holds its GPU
memory (:attr:`~repo_megatron.engines.base.RolloutEngine.generation_memory_after_update`).

Each phase is entered from the session's own methods, so the order of the loop (an eval after
the sync, a save after the eval) cannot leave the wrong side on the GPU; entering the phase one
is in does nothing (no barrier).
"""

from __future__ import annotations

import logging
from typing import Optional

from ..runtime import control
from ..trainer.offload import build_trainer_offload
from ..trainer.offload_state import TrainerOffload

log = logging.getLogger(__name__)


class Colocation:
    """The phase the GPUs of this rank are in, and the moves between phases. ``offload``: the
    trainer's offload (None: the trainer stays on its GPU); ``engine``: rank 0's rollout engine
    (None on the other ranks)."""

    def __init__(self, offload: Optional[TrainerOffload], engine=None):
        self.offload, self.engine = offload, engine
        self.figures: dict[str, float] = {}   # the last offload and restore, for the run's log
        if offload is not None and engine is not None:
            engine.generation_memory_after_update = False

    def rollout_phase(self) -> None:
        """Before a rollout or an evaluation: the trainer off the GPU on every rank."""
        if self.offload is None or self.offload.offloaded:
            return
        report = self.offload.offload()
        self.figures.update(report.metrics())
        control.barrier()        # every rank has let go before an engine takes memory back
        log.debug("trainer offloaded: %.2f GiB freed in %.2f s",
                  report.freed_bytes / 2**30, report.seconds)

    def training_phase(self) -> None:
        """Before the batch, the update, the weight sync, a checkpoint or an export: the
        engines' memory released, then the trainer back on the GPU on every rank."""
        if self.engine is not None:
            self.engine.release_memory()            # idempotent; a no-op unless colocated
        if self.offload is None or not self.offload.offloaded:
            return
        control.barrier()        # the engines have released before any rank takes memory
        seconds = self.offload.restore()
        self.figures["offload/restore_seconds"] = seconds
        log.debug("trainer restored in %.2f s", seconds)

    def take_metrics(self) -> dict[str, float]:
        """This rank's figures of the offload and restore since the last call (``offload/*``:
        state GiB, freed fraction, seconds each way); empty without an offload."""
        figures, self.figures = self.figures, {}
        return figures


def build_colocation(cfg, trainer, reference, engine) -> Colocation:
    """The colocation of a run: ``cfg.rollout.sglang.trainer_offload`` of ``trainer`` (a
    :class:`~repo_megatron.trainer.train_step.PolicyTrainer`) and the ``reference`` model's
    chunks, ``engine`` on rank 0."""
    offload = build_trainer_offload(cfg.rollout.sglang.trainer_offload, trainer,
                                    reference or ())
    return Colocation(offload, engine)
