"""GPTModel built from megatron-core's Transformer Engine layer spec where TE cannot be imported.

Without TE, megatron-core's TE wrapper classes are MagicMocks, so no model can be built from
``get_gpt_layer_with_transformer_engine_spec``. :func:`build_te_model` takes that real spec
(megatron-core's own ``TESpecProvider`` choices, qk norms included) and the block's final norm
(``transformer_block.LayerNormImpl``, ``TENorm`` whenever TE imports) and puts in each TE class's
place a CPU stand-in that checkpoints what the TE module does (TE 2.x): the same weight names
and TP splits, and an ``_extra_state`` exactly where TE has one in the sharded state dict.

- ``TENorm`` (TE's ``RMSNorm``, a fusible op): torch's RMSNorm plus ``_extra_state``, an empty
  uint8 tensor as TE's ``BasicOperation.get_extra_state`` returns without FP8 state
  (``transformer_engine/pytorch/ops/op.py``);
- ``TELayerNormColumnParallelLinear`` (TE's ``LayerNormLinear``): a ``ColumnParallelLinear`` with
  TE's ``layer_norm_weight``; its ``_extra_state`` is the local linear's (``None``), which
  megatron-core keeps for TE compatibility;
- ``TERowParallelLinear``: ``RowParallelLinear`` (same ``_extra_state``);
- ``TEDotProductAttention``: the local ``DotProductAttention``. TE's attention has extra state,
  but megatron-core's wrapper checkpoints only a learnable softmax offset (its
  ``sharded_state_dict``), so neither has an entry.

Any other TE class in the spec is an error: it would need a stand-in of its own.
"""

from __future__ import annotations

import dataclasses
from unittest import mock

import torch


class StandInTERMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm with the ``_extra_state`` of TE's RMSNorm (no FP8 state)."""

    def get_extra_state(self) -> torch.Tensor:
        return torch.empty(0, dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        # TE returns early on None or an empty tensor; anything else would be FP8 metadata.
        if state is not None and state.numel() != 0:
            raise AssertionError(f"stand-in norm got FP8 metadata: {state!r}")


class StandInTENorm:
    """``TENorm``'s constructor (a factory, as megatron-core's is)."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5):
        return StandInTERMSNorm(hidden_size, eps=eps)


def _standins() -> dict:
    from megatron.core.extensions import transformer_engine as te
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class StandInTELayerNormColumnParallelLinear(ColumnParallelLinear):
        def __init__(self, input_size: int, output_size: int, **kwargs):
            super().__init__(input_size, output_size, **kwargs)
            self.layer_norm_weight = torch.nn.Parameter(torch.ones(input_size))

    return {te.TENorm: StandInTENorm,
            te.TELayerNormColumnParallelLinear: StandInTELayerNormColumnParallelLinear,
            te.TERowParallelLinear: RowParallelLinear,
            te.TEDotProductAttention: DotProductAttention}


def _substitute(spec, standins: dict):
    """``spec`` (a ModuleSpec tree) with every TE class replaced by its stand-in."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    if isinstance(spec, ModuleSpec):
        return dataclasses.replace(spec, module=_substitute(spec.module, standins),
                                   submodules=_substitute(spec.submodules, standins))
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        return dataclasses.replace(spec, **{f.name: _substitute(getattr(spec, f.name), standins)
                                            for f in dataclasses.fields(spec)})
    if isinstance(spec, mock.Mock) or isinstance(spec, type) and spec.__module__.endswith(
            "extensions.transformer_engine"):
        if spec not in standins:
            raise AssertionError(f"no stand-in for TE class {spec!r} of the TE layer spec")
        return standins[spec]
    return spec


def te_layer_spec(qk_layernorm: bool):
    """megatron-core's ``get_gpt_layer_with_transformer_engine_spec(qk_layernorm=...)`` with the
    TE classes replaced by stand-ins (the spec code as it runs with TE >= 1.9 installed)."""
    from megatron.core.extensions import transformer_engine_spec_provider as provider
    from megatron.core.models.gpt import gpt_layer_specs

    with mock.patch.object(gpt_layer_specs, "TESpecProvider", provider.TESpecProvider,
                           create=True), \
            mock.patch.object(provider, "is_te_min_version", lambda version: True):
        spec = gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            qk_layernorm=qk_layernorm)
    return _substitute(spec, _standins())


def build_te_model(arch, parallel) -> list:
    """``build_model`` with the TE layer spec and the final norm TE gives (stand-ins, as above):
    a model whose sharded state dict has the keys of a TE model."""
    from megatron.core.transformer import transformer_block

    from repo_megatron.config.model import ModelConfig
    from repo_megatron.models import builder

    spec = te_layer_spec(arch.qk_layernorm)
    with mock.patch.object(builder, "layer_spec", lambda *args: spec), \
            mock.patch.object(transformer_block, "LayerNormImpl", StandInTENorm):
        return builder.build_model(arch, ModelConfig(transformer_impl="local"), parallel)
