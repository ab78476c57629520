"""Micro-batches padded to the multiple sequence parallelism and FP8 need (16 here, what FP8
asks for) train exactly like the trimmed ones: the same loss, gradient norm and gradients,
through real Megatron at TP=2 on gloo; and (GPU only) Transformer Engine with sequence
parallelism runs on the padded batches."""

import dataclasses
import os

import pytest
import torch

from tests.distributed import run_distributed
from tests.helpers import write_tiny_llama

MODES = ("token-mean", "seq-mean-token-mean")


def _batch(length_multiple: int) -> list:
    """Synthetic RePO groups (ragged prompts and responses, a rephrased sample per group) as
    the trainer's micro-batches."""
    from repo_megatron.run import batch as B
    from repo_megatron.run.batching import fixed_plan
    from repo_megatron.run.dry_run import synthetic_groups

    groups = synthetic_groups(prompts=2, group_size=4, max_new_tokens=9, seed=5)
    full = B.build_global_batch(groups, B.group_advantages(groups, "grpo", 1e-6), pad_id=0)
    plan = fixed_plan(full.lengths.tolist(), 1, 2, multiple=length_multiple)
    return B.micro_batches(full, plan[0])


def _step(root: str, mode: str, length_multiple: int, parallel, model_cfg) -> dict:
    """Loss, gradient norm and every gradient of one step from the initial weights."""
    from repo_megatron.algorithm import LossParams
    from repo_megatron.checkpoint.model_io import load_model
    from repo_megatron.config.optimizer import OptimizerConfig
    from repo_megatron.models.architecture import read_architecture
    from repo_megatron.models.builder import build_model
    from repo_megatron.trainer.train_step import PolicyTrainer

    arch = read_architecture(root)
    chunks = build_model(arch, model_cfg, parallel)
    load_model(chunks, os.path.join(root, "init"))
    trainer = PolicyTrainer(chunks, OptimizerConfig(lr=1e-3, clip_grad=0.0),
                            LossParams(loss_agg_mode=mode), total_steps=1)
    micro_batches = _batch(length_multiple)
    old = trainer.compute_logprobs(micro_batches)
    # a ratio != 1: old log-probs shifted on the real tokens only
    batch = [dataclasses.replace(mb, old_logprobs=o + 0.05 * mb.loss_mask)
             for mb, o in zip(micro_batches, old)]
    result = trainer.train_step(batch)
    grads = {name: p.main_grad.detach().clone().float()
             for name, p in trainer.model[0].named_parameters()}
    return {"loss": result.loss, "grad_norm": result.grad_norm, "grads": grads,
            "lengths": [mb.seq_length for mb in micro_batches]}


def _initialise(root: str, parallel, model_cfg) -> None:
    """Start the process groups and save the initial weights every step starts from."""
    from repo_megatron.checkpoint.model_io import save_model
    from repo_megatron.models.architecture import read_architecture
    from repo_megatron.models.builder import build_model
    from repo_megatron.runtime.distributed import initialize

    initialize(parallel, seed=11)
    save_model(build_model(read_architecture(root), model_cfg, parallel),
               os.path.join(root, "init"))


def _padded_and_trimmed(root: str):
    from repo_megatron.config.model import ModelConfig
    from repo_megatron.config.parallel import ParallelConfig

    parallel = ParallelConfig(tensor_model_parallel_size=2)
    model_cfg = ModelConfig(transformer_impl="local")
    _initialise(root, parallel, model_cfg)
    return {mode: (_step(root, mode, 1, parallel, model_cfg),
                   _step(root, mode, 16, parallel, model_cfg)) for mode in MODES}


def test_padding_to_the_multiple_changes_no_loss_or_gradient(tmp_path):
    root = write_tiny_llama(str(tmp_path / "model"))
    results = run_distributed(_padded_and_trimmed, 2, root, timeout=300)
    for rank, by_mode in enumerate(results):
        for mode, (trimmed, padded) in by_mode.items():
            where = f"rank {rank} {mode}"
            assert all(n % 16 == 0 for n in padded["lengths"]), padded["lengths"]
            assert any(n % 16 for n in trimmed["lengths"]), "nothing was padded"
            assert trimmed["loss"] != 0 and trimmed["grad_norm"] > 0
            # The padding is masked out exactly; what remains is float rounding of GEMMs of
            # another shape (fp32: relative 1e-6).
            assert abs(padded["loss"] - trimmed["loss"]) <= 1e-6 * abs(trimmed["loss"]), where
            assert abs(padded["grad_norm"] - trimmed["grad_norm"]) <= \
                1e-6 * trimmed["grad_norm"], where
            for name, grad in trimmed["grads"].items():
                diff = (padded["grads"][name] - grad).abs().max().item()
                assert diff <= 1e-6 * max(grad.abs().max().item(), 1e-12), \
                    f"{where}: gradient of {name} differs by {diff:.2e}"


def _te_sequence_parallel_step(root: str, recipe):
    from repo_megatron.config.model import ModelConfig
    from repo_megatron.config.parallel import ParallelConfig
    from repo_megatron.models.builder import sequence_length_multiple

    parallel = ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True)
    model_cfg = ModelConfig(transformer_impl="transformer_engine", params_dtype="bf16",
                            fp8="e4m3" if recipe else None, fp8_recipe=recipe or "delayed")
    _initialise(root, parallel, model_cfg)
    multiple = sequence_length_multiple(model_cfg, parallel)
    return _step(root, "token-mean", multiple, parallel, model_cfg), multiple


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", [None, "tensorwise"], ids=["bf16", "fp8-tensorwise"])
def test_transformer_engine_sequence_parallel_trains_on_padded_batches(tmp_path, recipe):
    from repo_megatron.models.builder import te_available

    if torch.cuda.device_count() < 2 or not te_available():
        pytest.skip("needs 2 GPUs (TP=2 with sequence parallelism) and Transformer Engine")
    root = write_tiny_llama(str(tmp_path / "model"))
    results = run_distributed(_te_sequence_parallel_step, 2, root, recipe, timeout=600)
    for step, multiple in results:
        assert multiple == (2 if recipe is None else 32)
        assert all(n % multiple == 0 for n in step["lengths"])
        assert torch.isfinite(torch.tensor(step["loss"])) and step["grad_norm"] > 0
    assert results[0][0]["loss"] == results[1][0]["loss"]
