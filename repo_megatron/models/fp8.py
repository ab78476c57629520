"""FP8 training with Transformer Engine: early checks of the ``model.fp8*`` keys and the token
padding FP8 GEMMs need.

The keys map onto Megatron-Core's ``TransformerConfig`` in :func:`builder.transformer_config`
(``fp8``, ``fp8_recipe``, ``fp8_param``, ``first_last_layers_bf16``,
``num_layers_at_{start,end}_in_bf16``); Megatron then wraps each transformer layer in
``fp8_utils.get_fp8_context`` (layers kept in bf16 get a null context). The embedding, the
output layer, the log-probs and the loss never run in FP8: the output layer is a plain
``ColumnParallelLinear`` and the log-probs cast the logits to fp32.

Hardware each recipe needs (Transformer Engine >= 2.4):

=============  ==========================================================
recipe         hardware
=============  ==========================================================
``delayed``    Hopper (sm90) or newer; per-tensor scales from an amax history
``tensorwise`` Hopper (sm90) or newer; per-tensor scales from the current amax
``blockwise``  Hopper (sm90) with CUDA 12.9+ (1x128 / 128x128 block scales)
``mxfp8``      Blackwell (sm100); 32-element blocks with E8M0 scales
=============  ==========================================================
"""

from __future__ import annotations

from ..errors import ConfigError
from ..config.model import ModelConfig
from ..config.parallel import ParallelConfig


def check_fp8(model: ModelConfig, parallel: ParallelConfig, num_layers: int) -> None:
    """Reject FP8 settings Megatron-Core would refuse later with a bare ValueError, naming keys.

    Mirrors ``TransformerConfig.__post_init__`` of megatron-core 0.16: delayed scaling cannot
    keep first/last layers in bf16, and at most one pipeline stage's worth of layers can be."""
    if model.fp8 is None:
        return  # the other fp8 keys are ignored without it
    bf16_ends = model.num_layers_at_start_in_bf16 + model.num_layers_at_end_in_bf16
    if bf16_ends and model.fp8_recipe == "delayed":
        raise ConfigError("model.fp8_recipe=delayed cannot keep layers in bf16 "
                          "(model.num_layers_at_start_in_bf16 / _end_in_bf16): use tensorwise, "
                          "blockwise or mxfp8")
    per_stage = num_layers // parallel.pipeline_model_parallel_size
    for key in ("num_layers_at_start_in_bf16", "num_layers_at_end_in_bf16"):
        if getattr(model, key) > per_stage:
            raise ConfigError(f"model.{key}={getattr(model, key)} exceeds the {per_stage} "
                              f"layers of one pipeline stage")


def fp8_token_multiple(recipe: str, tensor_model_parallel_size: int = 1,
                       sequence_parallel: bool = False) -> int:
    """The multiple a micro-batch's sequence length must be padded to under FP8.

    FP8 GEMMs need the token dimension aligned to 16 (32 for mxfp8's blocks):
    ``megatron.core.fp8_utils.get_fp8_align_size``. With sequence parallelism each TP rank
    holds ``seq / TP`` tokens per sequence, so the sequence is padded to ``align * TP``."""
    from megatron.core.enums import Fp8Recipe
    from megatron.core.fp8_utils import get_fp8_align_size

    align = get_fp8_align_size(Fp8Recipe(recipe))
    return align * (tensor_model_parallel_size if sequence_parallel else 1)


def fp8_padded_length(length: int, recipe: str, tensor_model_parallel_size: int = 1,
                      sequence_parallel: bool = False) -> int:
    """``length`` rounded up to :func:`fp8_token_multiple` (the padding is masked out of the
    loss like any other padding)."""
    multiple = fp8_token_multiple(recipe, tensor_model_parallel_size, sequence_parallel)
    return -(-length // multiple) * multiple
