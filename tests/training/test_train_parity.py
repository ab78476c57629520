"""Two optimizer steps give the same loss, gradient norm and parameters in every Megatron
layout (TP=2, PP=2, DP=2 with the distributed optimizer, TP2xPP2, PP2xVPP2) as at TP=1, for
every loss aggregation mode: 4 micro-batches of ragged responses (one fully masked sequence),
KL to a frozen reference model, entropy bonus, gradient clipping, Adam.

Weights start identical through a torch_dist checkpoint saved by the TP=1 run. Parameters
after the steps are compared by saving a torch_dist checkpoint in each layout and reading
both back as plain global tensors (``dcp_to_torch_save``): this compares every parameter
exactly, in the layout-independent form, without writing gathering code for each sharding
(QKV groups, gate/up, vocabulary padding, tied embeddings under PP).
"""

import os

import pytest
import torch

from tests.distributed import run_distributed
from tests.helpers import write_tiny_llama

MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
# The sequence-mean mode runs with tied embeddings (synchronised across PP stages).
TIED = {"seq-mean-token-mean"}
LAYOUTS = {  # name: (TP, PP, VPP, world size, distributed optimizer)
    "tp2": (2, 1, None, 2, False),
    "pp2": (1, 2, None, 2, False),
    "dp2": (1, 1, None, 2, True),
    "tp2pp2": (2, 2, None, 4, False),
    "pp2vpp2": (1, 2, 2, 2, False),
}
NUM_MICRO_BATCHES, MICRO_BATCH_SIZE, VOCAB = 4, 2, 1000
CLIP_GRAD = 0.5
TEMPERATURE = 0.9  # the policy's sampling temperature: log-probs of pi / T
# Adam's first step is lr * g / (|g| + eps): with a tiny eps, gradient entries that are ~0 up
# to rounding become +-lr, so any two summation orders would disagree by lr. An eps above the
# rounding noise keeps the update a continuous function of the gradient.
ADAM_EPS = 1e-4


def global_batch() -> list[dict]:
    """4 micro-batches of 2 sequences, prompts of 3-6 tokens, responses of 0-10 tokens, each
    micro-batch padded to its own length; micro-batch 0 has per-token advantages; the second
    sequence of each is marked rephrased (provenance metrics)."""
    g = torch.Generator().manual_seed(1)
    batches = []
    for k in range(NUM_MICRO_BATCHES):
        prompt = torch.randint(3, 7, (MICRO_BATCH_SIZE,), generator=g)
        response = torch.randint(1, 11, (MICRO_BATCH_SIZE,), generator=g)
        if k == 3:
            response[1] = 0  # a padding sequence: no response token at all
        seq = int((prompt + response).max())
        tokens = torch.randint(0, VOCAB, (MICRO_BATCH_SIZE, seq), generator=g)
        pos = torch.arange(seq)
        # position t scores tokens[t + 1]: the response occupies [p, p + r)
        loss_mask = ((pos + 1 >= prompt[:, None]) & (pos + 1 < (prompt + response)[:, None]))
        advantages = torch.randn(MICRO_BATCH_SIZE, generator=g)
        if k == 0:
            advantages = advantages[:, None] + 0.1 * torch.randn(MICRO_BATCH_SIZE, seq,
                                                                  generator=g)
        batches.append({"tokens": tokens, "loss_mask": loss_mask.float(), "advantages": advantages,
                        "ref_noise": 0.05 * torch.randn(MICRO_BATCH_SIZE, seq, generator=g),
                        # per-provenance metrics: a rephrased trace in every micro-batch
                        "provenance": torch.tensor([0, 1])})
    return batches


def _train_in_layout(root: str, tp: int, pp: int, vpp, distributed_optimizer: bool,
                     layout: str):
    from megatron.core import parallel_state

    from repo_megatron.algorithm import LossParams
    from repo_megatron.checkpoint.model_io import load_model, save_model
    from repo_megatron.config.model import ModelConfig
    from repo_megatron.config.optimizer import OptimizerConfig
    from repo_megatron.config.parallel import ParallelConfig
    from repo_megatron.models.architecture import read_architecture
    from repo_megatron.models.builder import build_model
    from repo_megatron.runtime.distributed import initialize
    from repo_megatron.training.forward import forward_logprobs
    from repo_megatron.training.train_step import PolicyTrainer, build_reference_model

    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                              virtual_pipeline_model_parallel_size=vpp)
    reference = layout == "tp1"
    initialize(parallel, seed=7 if reference else 99)  # only the checkpoint makes them agree
    dp, dp_rank = (parallel_state.get_data_parallel_world_size(),
                   parallel_state.get_data_parallel_rank())
    share = NUM_MICRO_BATCHES // dp
    micro_batches = global_batch()[dp_rank * share:(dp_rank + 1) * share]
    results = {}
    for mode in MODES:
        name = "tied" if mode in TIED else "untied"
        arch, model_cfg = read_architecture(os.path.join(root, name)), ModelConfig(
            transformer_impl="local")
        chunks = build_model(arch, model_cfg, parallel)
        init = os.path.join(root, "init", name)
        if reference and not os.path.exists(init):
            save_model(chunks, init)
        load_model(chunks, init)
        reference_model = build_reference_model(arch, model_cfg, parallel, init)
        trainer = PolicyTrainer(
            chunks, OptimizerConfig(lr=1e-2, clip_grad=CLIP_GRAD, adam_eps=ADAM_EPS,
                                    use_distributed_optimizer=distributed_optimizer),
            LossParams(loss_agg_mode=mode, loss_norm_length=16, kl_coef=0.1, entropy_coef=0.01,
                       dual_clip=3.0), total_steps=2, temperature=TEMPERATURE)
        old = trainer.compute_logprobs(micro_batches)
        ref = forward_logprobs(reference_model, micro_batches, TEMPERATURE)
        # noise: the policy starts at the reference, so KL would vanish at the first step
        batch = [{**mb, "old_logprobs": o, "ref_logprobs": r + mb["ref_noise"]}
                 for mb, o, r in zip(micro_batches, old, ref)]
        steps = [trainer.train_step(batch) for _ in range(2)]
        save_model(chunks, os.path.join(root, layout, mode))
        ref_after = forward_logprobs(reference_model, micro_batches, TEMPERATURE)
        results[mode] = {
            "steps": [(s.loss, s.grad_norm, s.metrics) for s in steps],
            "reference_vs_old": max((r - o).abs().max().item() for r, o in zip(ref, old)),
            "reference_drift": max((a - r).abs().max().item() for a, r in zip(ref_after, ref))}
    return results


def _global_params(directory: str) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path = directory + ".pt"
    if not os.path.exists(path):
        dcp_to_torch_save(directory, path)
    state = torch.load(path, weights_only=False)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("train_parity"))
    write_tiny_llama(os.path.join(root, "untied"), vocab_size=VOCAB)
    write_tiny_llama(os.path.join(root, "tied"), tie_word_embeddings=True, vocab_size=VOCAB)
    (ref,) = run_distributed(_train_in_layout, 1, root, 1, 1, None, False, "tp1", timeout=600)
    return root, ref


def test_reference_run_is_not_trivial(reference):
    root, ref = reference
    for mode in MODES:
        (loss1, norm1, metrics1), (loss2, norm2, metrics2) = ref[mode]["steps"]
        assert norm1 > CLIP_GRAD, "the gradient norm should exceed the clip (clipping is exercised)"
        assert loss1 != loss2 and metrics2["clipfrac_low"] + metrics2["clipfrac_high"] > 0
        assert metrics1["kl"] > 0 and metrics1["entropy"] > 0
        assert metrics1["rephrased/tokens_sum"] > 0 and metrics1["onpolicy/nll_sum"] > 0
        before, after = (_global_params(os.path.join(root, "init", "untied")),
                         _global_params(os.path.join(root, "tp1", mode)))
        if mode not in TIED:
            assert max((before[k] - after[k]).abs().max() for k in before) > 1e-3


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_training_equals_tp1(reference, layout):
    root, ref = reference
    tp, pp, vpp, world, distopt = LAYOUTS[layout]
    results = run_distributed(_train_in_layout, world, root, tp, pp, vpp, distopt, layout,
                              timeout=900)
    for mode in MODES:
        for rank, res in enumerate(results):
            assert res[mode]["reference_vs_old"] < 1e-6, "reference model != initial policy"
            assert res[mode]["reference_drift"] == 0, "the reference model must stay frozen"
            for step, ((loss, norm, metrics), (ref_loss, ref_norm, ref_metrics)) in enumerate(
                    zip(res[mode]["steps"], ref[mode]["steps"]), start=1):
                where = f"{layout} {mode} rank {rank} step {step}"
                assert abs(loss - ref_loss) < 1e-5, f"{where}: loss {loss} vs {ref_loss}"
                assert abs(norm - ref_norm) < 1e-5, f"{where}: grad norm {norm} vs {ref_norm}"
                assert metrics.keys() == ref_metrics.keys()
                for name, value in metrics.items():  # sums over tokens: relative
                    scale = max(1.0, abs(ref_metrics[name]))
                    assert abs(value - ref_metrics[name]) < 1e-5 * scale, f"{where}: {name}"
        ours = _global_params(os.path.join(root, layout, mode))
        theirs = _global_params(os.path.join(root, "tp1", mode))
        assert ours.keys() == theirs.keys()
        for key in theirs:
            diff = (ours[key] - theirs[key]).abs().max().item()
            assert diff < 1e-5, f"{layout} {mode}: parameter {key} differs by {diff:.2e}"
