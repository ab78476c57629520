"""Sequence packing (trainer/packing.py): the maps between a micro-batch's rows and its packed
row, the positions and the block-diagonal causal mask; and a packed forward through the real
Megatron model (local spec, TP2 on gloo) giving the log-probs of the unpacked one.

What only a GPU can confirm: the THD path (Transformer Engine's attention and rotary embedding
reading ``PackedSeqParams``), ``test_packing_thd_forward_matches_unpacked_under_te``."""

import os

import pytest
import torch

from repo_megatron.trainer import packing
from tests.distributed import run_distributed
from tests.helpers import write_tiny_llama

LENGTHS = torch.tensor([3, 0, 5, 2])  # a padding row (length 0) among them


def _values():
    return torch.arange(1, 4 * 5 + 1).view(4, 5) * (torch.arange(5) < LENGTHS[:, None])


def test_packing_layout_puts_each_sequence_after_the_last_and_pads_the_row():
    layout = packing.packed_layout(LENGTHS, 12)
    assert layout.cu_seqlens.tolist() == [0, 3, 8, 10, 12] and layout.cu_seqlens.dtype == torch.int32
    assert layout.max_seqlen == 5 and layout.total == 10
    row = packing.pack(_values(), layout)
    assert row.tolist() == [[1, 2, 3, 11, 12, 13, 14, 15, 16, 17, 0, 0]]
    assert torch.equal(packing.unpack(row, layout, torch.Size([4, 5])), _values())
    assert packing.position_ids(layout).tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 0, 1]]
    with pytest.raises(ValueError, match="10 tokens do not fit a packed row of 9 positions"):
        packing.packed_layout(LENGTHS, 9)


def test_packing_unpack_is_differentiable_and_keeps_padding_out_of_the_gradient():
    layout = packing.packed_layout(LENGTHS, 12)
    row = torch.randn(1, 12, 3, requires_grad=True)
    packing.unpack(row, layout, torch.Size([4, 5])).sum().backward()
    assert row.grad[0, :10].eq(1).all() and row.grad[0, 10:].eq(0).all()


def test_packing_mask_is_block_diagonal_and_causal():
    layout = packing.packed_layout(torch.tensor([2, 3]), 6)
    seen = ~packing.block_diagonal_causal_mask(layout)[0, 0]  # True = may attend
    assert seen.int().tolist() == [[1, 0, 0, 0, 0, 0],
                                   [1, 1, 0, 0, 0, 0],
                                   [0, 0, 1, 0, 0, 0],
                                   [0, 0, 1, 1, 0, 0],
                                   [0, 0, 1, 1, 1, 0],
                                   [0, 0, 0, 0, 0, 1]]


def test_packing_seq_params_are_megatrons_thd_boundaries():
    from megatron.core.packed_seq_params import PackedSeqParams

    params = packing.packed_seq_params(packing.packed_layout(LENGTHS, 12))
    assert isinstance(params, PackedSeqParams) and params.qkv_format == "thd"
    assert params.cu_seqlens_q.tolist() == params.cu_seqlens_kv.tolist() == [0, 3, 8, 10, 12]
    assert params.max_seqlen_q == params.max_seqlen_kv == 5


def _groups():
    from repo_megatron.run.dry_run import synthetic_groups
    return synthetic_groups(prompts=3, group_size=4, max_new_tokens=20, seed=2)


def _packed_and_unpacked_logprobs(root: str, impl: str, tp: int) -> dict:
    """Old log-probs of one step's sequences from fixed micro-batches and from packed
    token-budget ones (the run's own planner and builder), per sequence, on its loss mask."""
    from megatron.core import parallel_state as ps

    from repo_megatron.config.model import ModelConfig
    from repo_megatron.config.parallel import ParallelConfig
    from repo_megatron.models.architecture import read_architecture
    from repo_megatron.models.builder import build_model
    from repo_megatron.run import batch as B
    from repo_megatron.run.batching import fixed_plan, token_budget_plan
    from repo_megatron.runtime.distributed import initialize
    from repo_megatron.trainer.forward import forward_logprobs

    parallel = ParallelConfig(tensor_model_parallel_size=tp)
    initialize(parallel, seed=4)
    model = build_model(read_architecture(root), ModelConfig(transformer_impl=impl), parallel)
    groups = _groups()
    full = B.build_global_batch(groups, B.group_advantages(groups, "grpo", 1e-6), pad_id=0)
    lengths = full.lengths.tolist()
    dp = ps.get_data_parallel_world_size()
    out = {}
    for name, plan in (("fixed", fixed_plan(lengths, dp, 3)),
                       ("packed", token_budget_plan(lengths, dp, 3 * max(lengths), packed=True))):
        mine = plan[ps.get_data_parallel_rank()]
        mbs = B.micro_batches(full, mine)
        per_sequence = {}
        for p, mb, logp in zip(mine, mbs, forward_logprobs(model, mbs)):
            for row, i in enumerate(p.sequences):
                per_sequence[i] = logp[row][mb.loss_mask[row].bool()]
        out[name] = per_sequence
        out[f"{name}_shapes"] = [tuple(mb.forward_shape) for mb in mbs]
    return out


def test_packing_forward_gives_the_unpacked_logprobs_through_megatron(tmp_path):
    write_tiny_llama(str(tmp_path))
    for rank, out in enumerate(run_distributed(_packed_and_unpacked_logprobs, 2, str(tmp_path),
                                               "local", 2, timeout=300)):
        assert all(rows == 1 for rows, _ in out["packed_shapes"])
        assert len(out["packed_shapes"]) < len(out["fixed_shapes"])
        assert out["fixed"].keys() == out["packed"].keys() and len(out["fixed"]) == 12
        for i, ref in out["fixed"].items():
            assert ref.numel() > 0
            # the local spec's rotary embedding numbers the packed row 0..T-1: the same
            # attention up to the rounding of larger angles (trainer/packing.py; measured
            # 4.8e-7 at most)
            diff = (out["packed"][i] - ref).abs().max().item()
            assert diff < 1e-6, f"rank {rank} sequence {i}: {diff:.2e}"


@pytest.mark.gpu
def test_packing_thd_forward_matches_unpacked_under_te(tmp_path):
    from repo_megatron.models import builder
    from repo_megatron.runtime import cpu_compat

    if not (cpu_compat.has_gpu() and builder.te_available()):
        pytest.skip("needs a GPU and Transformer Engine (THD attention)")
    write_tiny_llama(str(tmp_path))
    (out,) = run_distributed(_packed_and_unpacked_logprobs, 1, str(tmp_path),
                             "transformer_engine", 1, timeout=300)
    for i, ref in out["fixed"].items():
        assert (out["packed"][i] - ref).abs().max().item() < 1e-4, i
