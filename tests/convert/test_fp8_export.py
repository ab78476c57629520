"""Weight sync and HF export dequantize FP8 weights (``model.fp8_param_gather``) to bf16 before
the TP gather: SGLang and Hugging Face take the model's params dtype."""

import json

import pytest
import torch

from repo_megatron.models.architecture import parse_hf_config
from repo_megatron.runtime import cpu_compat
from tests.distributed import free_port, run_distributed
from tests.helpers import write_tiny_llama

FP8_WEIGHTS = ("self_attention.linear_qkv", "self_attention.linear_proj")  # row / column split


class StandInQuantizedTensor(torch.Tensor):
    """A stand-in for Transformer Engine's ``QuantizedTensor``, which cannot be imported here:
    a wrapper tensor of nominal dtype bf16 whose storage is FP8 (e4m3) codes and a per-tensor
    ``scale_inv``, with the two parts of TE's interface export may use: ``detach`` (a tensor
    of the same kind) and ``dequantize(*, dtype=None)`` (a plain tensor, the nominal dtype by
    default). Any other op raises, so export cannot get by on what TE might do with raw FP8
    storage (a collective would move codes whose scales differ from rank to rank)."""

    @staticmethod
    def __new__(cls, codes: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype):
        self = torch.Tensor._make_wrapper_subclass(cls, codes.shape, dtype=dtype,
                                                   device=codes.device)
        self._codes, self._scale_inv = codes, scale_inv
        return self

    @classmethod
    def quantize(cls, values: torch.Tensor) -> "StandInQuantizedTensor":
        scale_inv = values.float().abs().max() / 448.0  # e4m3's largest normal
        return cls((values.float() / scale_inv).to(torch.float8_e4m3fn), scale_inv, values.dtype)

    def dequantize(self, *, dtype=None) -> torch.Tensor:
        return (self._codes.float() * self._scale_inv).to(dtype or self.dtype)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.detach.default:
            (t,) = args
            return cls(t._codes, t._scale_inv, t.dtype)
        raise NotImplementedError(f"the stand-in QuantizedTensor has no {func}")


def _export_fp8_weights(model_dir: str) -> dict:
    """TP=2: this rank's export with the FP8_WEIGHTS of layer 0 as stand-in FP8 parameters,
    and the export of the same model holding their dequantized values as plain bf16."""
    from unittest import mock

    from megatron.core import fp8_utils
    from megatron.core.tensor_parallel.layers import copy_tensor_model_parallel_attributes

    from repo_megatron.config.model import ModelConfig
    from repo_megatron.config.parallel import ParallelConfig
    from repo_megatron.models.builder import build_model
    from repo_megatron.runtime.distributed import initialize
    from repo_megatron.weight_sync import megatron_to_hf_named_tensors

    parallel = ParallelConfig(tensor_model_parallel_size=2)
    initialize(parallel, seed=5)
    arch = parse_hf_config(json.load(open(f"{model_dir}/config.json")))
    model = build_model(arch, ModelConfig(params_dtype="bf16", transformer_impl="local"),
                        parallel)
    layer = model[0].decoder.layers[0]
    quantized = {}
    for name in FP8_WEIGHTS:
        module = layer.get_submodule(name)
        fp8 = StandInQuantizedTensor.quantize(module.weight.detach())
        with torch.no_grad():  # the bf16 model means what the FP8 one holds
            module.weight.copy_(fp8.dequantize())
        quantized[name] = fp8
    expected = {k: v.float().numpy() for k, v in megatron_to_hf_named_tensors(model, arch)}
    for name, fp8 in quantized.items():
        module = layer.get_submodule(name)
        param = torch.nn.Parameter(fp8, requires_grad=False)
        copy_tensor_model_parallel_attributes(param, module.weight)
        module._parameters["weight"] = param
    # megatron-core's is_float8tensor tests isinstance against TE 2.x's QuantizedTensor.
    with mock.patch.object(fp8_utils, "HAVE_TE_FP8_TENSOR_CLASS", True), \
            mock.patch.object(fp8_utils, "FP8_TENSOR_CLASS", StandInQuantizedTensor):
        assert all(fp8_utils.is_float8tensor(layer.get_submodule(n).weight)
                   for n in FP8_WEIGHTS)
        exported = list(megatron_to_hf_named_tensors(model, arch))
    return {"expected": expected, "qkv_scale": float(quantized[FP8_WEIGHTS[0]]._scale_inv),
            "types": {k: (type(v).__name__, v.dtype) for k, v in exported},
            "exported": {k: v.float().numpy() for k, v in exported}}


def test_fp8_weights_are_dequantized_to_bf16_before_the_tp_gather(tmp_path):
    model_dir = write_tiny_llama(str(tmp_path / "tiny"), num_layers=2)
    results = run_distributed(_export_fp8_weights, 2, model_dir)
    for rank, res in enumerate(results):
        assert res["exported"].keys() == res["expected"].keys()
        assert set(res["types"].values()) == {("Tensor", torch.bfloat16)}, rank
        for name, value in res["exported"].items():
            assert (value == res["expected"][name]).all(), f"rank {rank}: {name}"
    # The TP shards were quantized with scales of their own: raw FP8 codes gathered from both
    # ranks would not be one tensor.
    assert results[0]["qkv_scale"] != results[1]["qkv_scale"]


@pytest.mark.gpu
def test_te_fp8_weights_export_as_bf16(tmp_path):
    """Transformer Engine's own FP8 weights (built under fp8_model_init by megatron-core when
    TransformerConfig.fp8_param is set) export as plain bf16 equal to their dequantized
    values."""
    from repo_megatron.models import builder

    if not (cpu_compat.has_gpu() and builder.te_available()):
        pytest.skip("needs a GPU (sm90+) and Transformer Engine")
    from megatron.core.fp8_utils import is_float8tensor

    from repo_megatron.config.model import ModelConfig
    from repo_megatron.config.parallel import ParallelConfig
    from repo_megatron.models.weight_mapping import split_qkv
    from repo_megatron.runtime.distributed import LaunchEnv, initialize, teardown
    from repo_megatron.weight_sync import megatron_to_hf_named_tensors

    write_tiny_llama(str(tmp_path))
    arch = parse_hf_config(json.load(open(tmp_path / "config.json")))
    cfg = ModelConfig(fp8="e4m3", fp8_recipe="tensorwise", params_dtype="bf16",
                      transformer_impl="transformer_engine", fp8_param_gather=True)
    initialize(ParallelConfig(), seed=3, env=LaunchEnv(0, 1, 0, "127.0.0.1", free_port(), "single"))
    try:
        model = builder.build_model(arch, cfg, ParallelConfig())
        qkv = model[0].decoder.layers[0].self_attention.linear_qkv.weight
        assert is_float8tensor(qkv)
        exported = dict(megatron_to_hf_named_tensors(model, arch))
        assert all(type(t) is torch.Tensor and t.dtype == torch.bfloat16
                   for t in exported.values())
        q, k, v = split_qkv(qkv.dequantize(dtype=torch.bfloat16), arch.num_attention_heads,
                            arch.num_query_groups, arch.head_dim)
        assert torch.equal(exported["model.layers.0.self_attn.q_proj.weight"], q)
    finally:
        teardown()
