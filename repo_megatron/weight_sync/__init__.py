"""Weight sync: how the trainer's weights reach a rollout engine, all of it in this package.

- :mod:`.plan`: the parameter plan (each parameter's Hugging Face names and TP split) and the
  TP gather: this rank's parameters as full HF tensors;
- :mod:`.buckets`: grouping them into buckets of bounded size;
- :mod:`.streamer`: :class:`WeightStreamer`, the per-rank side every trainer rank runs;
- :mod:`.base`: the strategy interface; one strategy per file (:mod:`.disk`,
  :mod:`.distributed`, :mod:`.tensor` for SGLang servers, :mod:`.embedded` for the embedded
  engine), the SGLang ones named in :mod:`.registry` (``rollout.sglang.weight_sync``);
- :mod:`.sender` and :mod:`.session`: one pipeline stage's sender, and the sequence of one
  update on the engine's rank (pause, sessions, flush, version, continue).

Importing this package loads none of its submodules (the config reads the registry without
torch): each name below is imported on first use.
"""

from __future__ import annotations

from ..lazy_exports import lazy_getattr

_EXPORTS = {"STRATEGIES": ".registry", "SyncPlan": ".base", "SyncTarget": ".base",
            "WeightSyncStrategy": ".base", "HFExport": ".plan",
            "megatron_to_hf_named_tensors": ".plan", "WeightStreamer": ".streamer"}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
