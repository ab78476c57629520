"""The rollout side: the RePO stage (no Megatron), which samples through the engine interface
(:mod:`repo_megatron.engines.base`).

Importing this package loads none of its submodules (the config reads the registries of
:mod:`.injection` and :mod:`.replay` without torch): each name below is imported on first use.
"""

from __future__ import annotations

from ..lazy_exports import lazy_getattr

_EXPORTS = {"RolloutStage": ".stage", "sampling_params": ".stage", "Group": ".types",
            "Prompt": ".types", "RolloutBatch": ".types", "Sample": ".types"}

__all__ = sorted(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
