"""With one optimizer step per rollout batch, the old log-probs may come from the training
forward itself (detached) instead of a separate forward pass: the loss, its metrics, every
gradient and the updated parameters are the same either way, at TP=1, TP=2 and PP=2, and the
log-probs the step hands back are the ones the separate forward computes, on every stage.

Both paths run in the same processes from the same weights (a torch_dist checkpoint), on the
micro-batches of the layout-parity test (ragged responses, a fully masked sequence, per-token
advantages), with KL to a frozen reference, an entropy bonus, dual-clip and gradient clipping.
"""

import dataclasses
import os

import pytest
import torch

from tests.distributed import run_distributed
from tests.helpers import write_tiny_llama
from tests.trainer.test_train_parity import TEMPERATURE, VOCAB, global_batch

LAYOUTS = {"tp1": (1, 1, 1), "tp2": (2, 1, 2), "pp2": (1, 2, 2)}  # name: (TP, PP, world)


def _both_paths(root: str, tp: int, pp: int):
    from megatron.core import parallel_state

    from repo_megatron.algorithm import LossParams
    from repo_megatron.checkpoint.model_io import load_model, save_model
    from repo_megatron.config.model import ModelConfig
    from repo_megatron.config.optimizer import OptimizerConfig
    from repo_megatron.config.parallel import ParallelConfig
    from repo_megatron.models.architecture import read_architecture
    from repo_megatron.models.builder import build_model
    from repo_megatron.runtime.distributed import initialize
    from repo_megatron.trainer.forward import forward_logprobs
    from repo_megatron.trainer.train_step import PolicyTrainer, build_reference_model

    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    initialize(parallel, seed=11)
    arch, model_cfg = read_architecture(os.path.join(root, "model")), ModelConfig(
        transformer_impl="local")
    init = os.path.join(root, "init")
    if not os.path.exists(init):  # the TP=1 run writes the weights every layout starts from
        save_model(build_model(arch, model_cfg, parallel), init)
    micro_batches, ref_noise = global_batch()
    reference = build_reference_model(arch, model_cfg, parallel, init)
    refs = forward_logprobs(reference, micro_batches, TEMPERATURE)

    def one_step(separate: bool):
        chunks = build_model(arch, model_cfg, parallel)
        load_model(chunks, init)
        trainer = PolicyTrainer(
            chunks, OptimizerConfig(lr=1e-2, clip_grad=0.5, adam_eps=1e-4),
            LossParams(kl_coef=0.1, entropy_coef=0.01, dual_clip=3.0), total_steps=1,
            temperature=TEMPERATURE)
        olds = trainer.compute_logprobs(micro_batches) if separate else [None] * len(refs)
        batch = [dataclasses.replace(mb, old_logprobs=old, ref_logprobs=ref + noise)
                 for mb, old, ref, noise in zip(micro_batches, olds, refs, ref_noise)]
        result = trainer.train_step(batch)
        grads = {name: p.main_grad.clone() for chunk in trainer.model
                 for name, p in chunk.named_parameters()}
        params = {name: p.detach().clone() for chunk in trainer.model
                  for name, p in chunk.named_parameters()}
        return result, olds, grads, params

    separate, olds, separate_grads, separate_params = one_step(separate=True)
    fused, _, fused_grads, fused_params = one_step(separate=False)
    assert separate.logprobs is None and fused.logprobs is not None
    diff = lambda a, b: max((a[k] - b[k]).abs().max().item() for k in a)  # noqa: E731
    return {
        "stage": parallel_state.get_pipeline_model_parallel_rank(),
        "loss": (separate.loss, fused.loss), "grad_norm": (separate.grad_norm, fused.grad_norm),
        "metrics": (separate.metrics, fused.metrics),
        "grad_diff": diff(separate_grads, fused_grads),
        "grad_max": max(g.abs().max().item() for g in separate_grads.values()),
        "param_diff": diff(separate_params, fused_params),
        "logprob_diff": max((a - b).abs().max().item() for a, b in zip(olds, fused.logprobs)),
        "logprob_shapes": [tuple(lp.shape) for lp in fused.logprobs],
        "batch_shapes": [tuple(mb.shape) for mb in micro_batches],
    }


@pytest.fixture(scope="module")
def tp1(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("old_logprobs"))
    write_tiny_llama(os.path.join(root, "model"), vocab_size=VOCAB)
    return root, run_distributed(_both_paths, 1, root, 1, 1, timeout=600)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_old_logprobs_from_the_training_forward_give_the_same_step(tp1, layout):
    root, results = tp1
    tp, pp, world = LAYOUTS[layout]
    if layout != "tp1":
        results = run_distributed(_both_paths, world, root, tp, pp, timeout=600)
    for rank, res in enumerate(results):
        where = f"{layout} rank {rank}"
        (loss_a, loss_b), (norm_a, norm_b) = res["loss"], res["grad_norm"]
        assert loss_a != 0 and norm_a > 0.5, f"{where}: the step must do something"
        assert abs(loss_a - loss_b) < 1e-6, f"{where}: loss {loss_a} vs {loss_b}"
        assert abs(norm_a - norm_b) < 1e-6 * norm_a, f"{where}: grad norm {norm_a} vs {norm_b}"
        metrics_a, metrics_b = res["metrics"]
        assert metrics_a.keys() == metrics_b.keys() and "kl" in metrics_a
        for name in metrics_a:
            assert abs(metrics_a[name] - metrics_b[name]) < 1e-6, f"{where}: {name}"
        assert res["grad_diff"] < 1e-6 * res["grad_max"], f"{where}: gradients differ"
        assert res["param_diff"] < 1e-6, f"{where}: updated parameters differ"
        # every stage gets the forward's log-probs, as compute_logprobs returns them
        assert res["logprob_shapes"] == res["batch_shapes"]
        assert res["logprob_diff"] < 1e-5, f"{where} (stage {res['stage']}): log-probs"
