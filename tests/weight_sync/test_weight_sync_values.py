"""Weight sync delivers the Hugging Face weights bit for bit.

A tiny transformers model is converted to a Megatron checkpoint and loaded at TP1, TP2 and PP2
(gloo); every stage streams its buckets (1 MB, so tensors of several buckets travel) through
:class:`WeightStreamer` to rank 0, which must receive exactly the transformers tensors: names,
dtypes and bits, for an untied Llama whose vocabulary needs padding and a tied Qwen2 with QKV
biases, in fp32 and bf16. The oracle is the transformers model the checkpoint came from, never
our own export. The model is wrapped as training wraps it (Float16Module, Megatron DDP) after
the parameter plan was read; the plan is reused while the parameters stay, so the tests also
check that later syncs see in-place updates and a replaced parameter.
"""

import os

import pytest
import torch
from safetensors.torch import load, load_file, save, save_file

from repo_megatron.convert import convert_hf_to_megatron
from tests.convert.tiny_models import make_tiny_model
from tests.distributed import run_distributed

CASES = [("llama", torch.float32), ("qwen2", torch.float32), ("llama", torch.bfloat16)]
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def _case_name(family: str, dtype: torch.dtype) -> str:
    return f"{family}-{DTYPE_NAMES[dtype]}"


def _hf_model(root: str, family: str, dtype: torch.dtype) -> str:
    """A tiny random ``family`` model saved in ``dtype``."""
    directory = make_tiny_model(family, os.path.join(root, _case_name(family, dtype)))
    if dtype != torch.float32:
        path = os.path.join(directory, "model.safetensors")
        save_file({k: v.to(dtype) for k, v in load_file(path).items()}, path,
                  metadata={"format": "pt"})
    return directory


def _synced_weights(root: str, tp: int, pp: int) -> dict:
    """Per case, the model built and loaded as training does it (Float16Module for bf16, then
    Megatron DDP, which moves every parameter's data into its buffers) after a first sync
    made the plan. On rank 0, three syncs' HF tensors: as loaded; after every parameter + 1
    in place; after the final norm was replaced by a new Parameter. On every rank, whether the
    plan was kept through all that and rebuilt exactly where a parameter was replaced."""
    from repo_megatron.checkpoint.model_io import load_model
    from repo_megatron.config.model import ModelConfig
    from repo_megatron.config.parallel import ParallelConfig
    from repo_megatron.config.rollout import SGLangConfig
    from repo_megatron.models.architecture import read_architecture
    from repo_megatron.models.builder import build_model
    from repo_megatron.runtime.distributed import initialize
    from repo_megatron.trainer.train_step import wrap_model
    from repo_megatron.weight_sync.streamer import WeightStreamer, gather_hf_weights

    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    initialize(parallel, seed=7)
    rank0 = torch.distributed.get_rank() == 0
    out = {}
    for family, dtype in CASES:
        name = _case_name(family, dtype)
        ckpt = os.path.join(root, name, "megatron")
        arch = read_architecture(os.path.join(ckpt, "hf"))
        chunks = build_model(arch, ModelConfig(transformer_impl="local",
                                               params_dtype=DTYPE_NAMES[dtype]), parallel)
        load_model(chunks, ckpt)
        streamer = WeightStreamer(chunks, arch, SGLangConfig(weight_bucket_mb=1))
        gather_hf_weights(streamer)
        plan = streamer.export
        wrap_model(chunks, use_distributed_optimizer=True)
        loaded = gather_hf_weights(streamer)
        with torch.no_grad():
            for p in (p for c in chunks for p in c.parameters()):
                p.add_(1)
        updated = gather_hf_weights(streamer)
        kept = streamer.export is plan
        holds_norm = False
        for chunk in chunks:
            if chunk.post_process:
                norm, holds_norm = chunk.decoder.final_layernorm, True
                norm.weight = torch.nn.Parameter(norm.weight.detach() + 1)
        replaced = gather_hf_weights(streamer)
        rebuilt_where_replaced = (streamer.export is not plan) == holds_norm
        # bytes, not tensors: torch would share tensors with the parent through this
        # process, which exits before the parent reads them (and bf16 has no numpy)
        out[name] = (*(_to_bytes(w) if rank0 else None for w in (loaded, updated, replaced)),
                     kept, rebuilt_where_replaced)
    return out


def _to_bytes(weights: dict) -> bytes:
    return save({k: v.clone() for k, v in weights.items()})


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """case -> the transformers tensors; each converted to a torch_dist checkpoint."""
    root = str(tmp_path_factory.mktemp("sync_values"))
    refs = {}
    for family, dtype in CASES:
        hf = _hf_model(root, family, dtype)
        convert_hf_to_megatron(hf, os.path.join(root, _case_name(family, dtype), "megatron"),
                               tp=2, progress=False)
        refs[_case_name(family, dtype)] = load_file(os.path.join(hf, "model.safetensors"))
    return root, refs


def _assert_identical(got: dict, want: dict, what: str) -> None:
    assert got.keys() == want.keys(), f"{what}: {sorted(got.keys() ^ want.keys())}"
    for k, t in want.items():
        assert got[k].dtype == t.dtype, f"{what}: {k} is {got[k].dtype}, not {t.dtype}"
        assert torch.equal(got[k], t), f"{what}: {k} differs"


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)], ids=["tp1", "tp2", "pp2"])
def test_streamed_weights_are_the_transformers_weights_bit_for_bit(checkpoints, tp, pp):
    root, refs = checkpoints
    results = run_distributed(_synced_weights, tp * pp, root, tp, pp, timeout=600)
    for name, want in refs.items():
        loaded, updated, replaced = (load(w) for w in results[0][name][:3])
        _assert_identical(loaded, want, f"{name} tp{tp} pp{pp}")
        plus_one = {k: t + 1 for k, t in want.items()}
        _assert_identical(updated, plus_one, f"{name} tp{tp} pp{pp}, updated in place")
        plus_one["model.norm.weight"] = plus_one["model.norm.weight"] + 1
        _assert_identical(replaced, plus_one, f"{name} tp{tp} pp{pp}, final norm replaced")
        # every rank: one plan while the parameters stay, a new one when one is replaced
        assert all(r[name][3] for r in results), f"{name}: the plan was rebuilt needlessly"
        assert all(r[name][4] for r in results), \
            f"{name}: a stale plan was used, or a plan rebuilt where nothing was replaced"
