"""Every rollout engine, side by side, behind one interface (:mod:`.base`: what every engine
must do).

- :mod:`.embedded`: :class:`HFEngine`, a transformers model in the trainer's rank 0 (CPU is
  fine), with continuous batching;
- :mod:`.sglang`: :class:`SGLangEngine`, SGLang servers over HTTP (client, sglang-router,
  launcher);
- :mod:`.sglang_server`: ``repo-megatron serve``, an SGLang-compatible HTTP server over the
  embedded engine (to run the SGLang path without a GPU);
- :mod:`.factory`: :func:`build_engine`, the config -> an engine.

How the trainer's weights reach each engine is :mod:`repo_megatron.weight_sync`'s. Importing
this package loads none of its submodules: each name below is imported on first use.
"""

from __future__ import annotations

from ..lazy_exports import lazy_getattr

_EXPORTS = {"GenerationResult": ".base", "GenerationStream": ".base", "RolloutEngine": ".base",
            "SamplingParams": ".base", "HFEngine": ".embedded", "build_engine": ".factory",
            "SGLangEngine": ".sglang.engine"}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
