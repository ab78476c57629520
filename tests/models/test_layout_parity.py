"""The same weights give the same log-probs in every Megatron layout (real TP/PP/VPP on gloo),
in fp32 and in bf16 (the shipped configs' precision).

Weights are made identical by saving a torch_dist checkpoint in one layout and loading it in
another, so resharding by dist_checkpointing is tested too. The checkpoint's fp32 weights are
rounded to bf16 first, so the bf16 model holds exactly the fp32 model's weights: the bf16
runs differ from the fp32 ones by rounding in the computation only.

bf16 tolerance. bf16 keeps 8 significant bits (unit roundoff 2^-9): the computation rounds
at every layer, and another layout rounds at other places (TP partial sums are rounded before
their all-reduce). The rounding error of the computation is measured in the reference run:
``E = max |logp_bf16 - logp_fp32|`` at TP=1 (fp32 stands in for exact: its own error is
~1e-6). A layout's distance from TP=1 is then bounded by the sum of the two runs' errors
(:func:`tests.helpers.bf16_layout_bound`: 2E, 4E with tensor parallelism). A layout bug (a
shard in the wrong place, a missing all-reduce) moves log-probs by O(1), far beyond that.
"""

import os

import pytest
import torch

from tests.distributed import run_distributed
from tests.helpers import bf16_layout_bound, write_tiny_llama

LAYOUTS = {  # name: (TP, PP, VPP, world size)
    "tp2": (2, 1, None, 2),
    "pp2": (1, 2, None, 2),
    "tp2pp2": (2, 2, None, 4),
    "pp2vpp2": (1, 2, 2, 2),
}
FP32_TOLERANCE = 1e-5


def _logprobs_in_layout(root: str, tp: int, pp: int, vpp, load_from, save_to):
    from repo_megatron.config.model import ModelConfig
    from repo_megatron.config.parallel import ParallelConfig
    from repo_megatron.checkpoint.model_io import load_model, save_model
    from repo_megatron.models.architecture import read_architecture
    from repo_megatron.models.builder import build_model
    from repo_megatron.runtime.distributed import initialize
    from repo_megatron.trainer.forward import forward_logprobs
    from repo_megatron.trainer.micro_batch import MicroBatch

    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                              virtual_pipeline_model_parallel_size=vpp)
    # Loading layouts initialise with another seed: only the checkpoint can make them agree.
    initialize(parallel, seed=7 if load_from is None else 99)
    tokens = torch.randint(0, 1000, (8, 24), generator=torch.Generator().manual_seed(0))
    micro_batches = [MicroBatch(tokens=t) for t in tokens.split(2)]
    result = {}
    for tied in (False, True):
        name = "tied" if tied else "untied"
        arch = read_architecture(os.path.join(root, name))
        model = build_model(arch, ModelConfig(transformer_impl="local"), parallel)
        if load_from:
            load_model(model, os.path.join(root, load_from, name))
        else:  # the reference: weights that bf16 represents exactly
            for p in (p for chunk in model for p in chunk.parameters()):
                p.data.copy_(p.data.to(torch.bfloat16))
        if save_to:
            save_model(model, os.path.join(root, save_to, name))
        result[name] = torch.cat(forward_logprobs(model, micro_batches))[:, :-1]
        bf16 = build_model(arch, ModelConfig(transformer_impl="local", params_dtype="bf16"),
                           parallel)
        load_model(bf16, os.path.join(root, load_from or save_to, name))  # exact: bf16 values
        assert {p.dtype for chunk in bf16 for p in chunk.parameters()} == {torch.bfloat16}
        result[f"{name}_bf16"] = torch.cat(forward_logprobs(bf16, micro_batches))[:, :-1]
    return result


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("parity"))
    write_tiny_llama(os.path.join(root, "untied"))
    write_tiny_llama(os.path.join(root, "tied"), tie_word_embeddings=True)
    (ref,) = run_distributed(_logprobs_in_layout, 1, root, 1, 1, None, None, "ckpt_tp1")
    return root, ref


def bf16_rounding_error(ref: dict, name: str) -> float:
    """``E``: how far bf16 computation moves the TP=1 log-probs from fp32 (module docstring)."""
    return (ref[f"{name}_bf16"] - ref[name]).abs().max().item()


def test_bf16_rounding_error_is_that_of_bf16(reference):
    _, ref = reference
    for name in ("untied", "tied"):
        assert ref[f"{name}_bf16"].dtype == torch.float32  # log-probs stay fp32
        error = bf16_rounding_error(ref, name)
        # bf16 did run (the error is not fp32's), and it is rounding, not a bug: a few
        # hundredths of a nat at most for logits of order 1 through 4 layers.
        assert 1e-4 < error < 0.05, f"{name}: bf16 vs fp32 log-probs differ by {error:.2e}"


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_logprobs_equal_tp1(reference, layout):
    root, ref = reference
    tp, pp, vpp, world = LAYOUTS[layout]
    # tp2pp2 re-saves in its own layout; pp2vpp2 then loads that (resharding both ways).
    load_from = "ckpt_tp2pp2" if layout == "pp2vpp2" and os.path.exists(
        os.path.join(root, "ckpt_tp2pp2")) else "ckpt_tp1"
    save_to = "ckpt_tp2pp2" if layout == "tp2pp2" else None
    results = run_distributed(_logprobs_in_layout, world, root, tp, pp, vpp, load_from, save_to)
    for rank, res in enumerate(results):
        for name in ("untied", "tied"):
            assert res[name].shape == ref[name].shape
            diff = (res[name] - ref[name]).abs().max().item()
            assert diff < FP32_TOLERANCE, f"{layout} rank {rank} {name}: max |dlogp| = {diff:.2e}"
            error = bf16_rounding_error(ref, name)
            diff = (res[f"{name}_bf16"] - ref[f"{name}_bf16"]).abs().max().item()
            assert diff <= bf16_layout_bound(error, tp), \
                f"{layout} rank {rank} {name} bf16: max |dlogp| = {diff:.2e}, E = {error:.2e}"
    # Sanity: the weights were random, so log-probs are not trivially equal to a constant.
    assert ref["untied"].std() > 1e-3
    assert not torch.allclose(ref["untied"], ref["tied"])
