"""The same weights give the same log-probs in every Megatron layout (real TP/PP/VPP on gloo).

Weights are made identical by saving a torch_dist checkpoint in one layout and loading it in
another, so resharding by dist_checkpointing is tested too.
"""

import os

import pytest
import torch

from tests.distributed import run_distributed
from tests.helpers import write_tiny_llama

LAYOUTS = {  # name: (TP, PP, VPP, world size)
    "tp2": (2, 1, None, 2),
    "pp2": (1, 2, None, 2),
    "tp2pp2": (2, 2, None, 4),
    "pp2vpp2": (1, 2, 2, 2),
}


def _logprobs_in_layout(root: str, tp: int, pp: int, vpp, load_from, save_to):
    from repo_megatron.config.model import ModelConfig
    from repo_megatron.config.parallel import ParallelConfig
    from repo_megatron.checkpoint.model_io import load_model, save_model
    from repo_megatron.models.architecture import read_architecture
    from repo_megatron.models.builder import build_model
    from repo_megatron.runtime.distributed import initialize
    from repo_megatron.training.forward import forward_logprobs

    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                              virtual_pipeline_model_parallel_size=vpp)
    # Loading layouts initialise with another seed: only the checkpoint can make them agree.
    initialize(parallel, seed=7 if load_from is None else 99)
    tokens = torch.randint(0, 1000, (8, 24), generator=torch.Generator().manual_seed(0))
    micro_batches = [{"tokens": t} for t in tokens.split(2)]
    result = {}
    for tied in (False, True):
        name = "tied" if tied else "untied"
        arch = read_architecture(os.path.join(root, name))
        model = build_model(arch, ModelConfig(transformer_impl="local"), parallel)
        if load_from:
            load_model(model, os.path.join(root, load_from, name))
        if save_to:
            save_model(model, os.path.join(root, save_to, name))
        result[name] = torch.cat(forward_logprobs(model, micro_batches))[:, :-1]
    return result


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("parity"))
    write_tiny_llama(os.path.join(root, "untied"))
    write_tiny_llama(os.path.join(root, "tied"), tie_word_embeddings=True)
    (ref,) = run_distributed(_logprobs_in_layout, 1, root, 1, 1, None, None, "ckpt_tp1")
    return root, ref


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
            assert diff < 1e-5, f"{layout} rank {rank} {name}: max |dlogp| = {diff:.2e}"
    # Sanity: the weights were random, so log-probs are not trivially equal to a constant.
    assert ref["untied"].std() > 1e-3
    assert not torch.allclose(ref["untied"], ref["tied"])
