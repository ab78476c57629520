"""Two optimizer steps give the same loss, gradient norm and parameters in every Megatron
layout (TP=2, PP=2, DP=2 with the distributed optimizer, TP2xPP2, PP2xVPP2) as at TP=1, for
every loss aggregation mode: 4 micro-batches of ragged responses (one fully masked sequence),
KL to a frozen reference model, entropy bonus, gradient clipping, Adam.

Each layout also runs the steps as the shipped configs do: bf16 weights (Float16Module), the
distributed optimizer with fp32 main weights, gradients reduced in fp32, log-probs and the loss
in fp32 (a test checks the dtypes along that path). The bf16 runs are compared with the bf16
run at TP=1 within bf16's rounding: the loss and the gradient norm to bf16's resolution
(2^-8 of their value: the layouts agree in every digit bf16 has); each parameter tensor (the
fp32 main weights) within the rounding error of the TP=1 run, ``E = max |bf16 - fp32|`` of
that tensor after the TP=1 runs, as :func:`tests.helpers.bf16_layout_bound` derives it (2E,
4E with tensor parallelism). (A scalar's own E is no scale: the loss averages thousands of
rounding errors, which can cancel by chance.)

Weights start identical through a torch_dist checkpoint saved by the TP=1 run (rounded to bf16
numbers, so the bf16 runs start from exactly the fp32 runs' weights). Parameters after the steps
are compared by saving a torch_dist checkpoint in each layout (with the distributed
optimizer's fp32 main weights for bf16) and reading it back as plain global tensors
(``dcp_to_torch_save``): this compares every parameter exactly, in the layout-independent
form, without writing gathering code for each sharding (QKV groups, gate/up, vocabulary
padding, tied embeddings under PP).
"""

import contextlib
import dataclasses
import os

import pytest
import torch

from tests.distributed import run_distributed
from tests.helpers import BF16_RESOLUTION, bf16_layout_bound, global_tensors, write_tiny_llama

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
BF16 = "bf16 token-mean"  # the bf16 run's key in the results
NUM_MICRO_BATCHES, MICRO_BATCH_SIZE, VOCAB = 4, 2, 1000
CLIP_GRAD = 0.5
TEMPERATURE = 0.9  # the policy's sampling temperature: log-probs of pi / T
# Adam's first step is lr * g / (|g| + eps): with a tiny eps, gradient entries that are ~0 up
# to rounding become +-lr, so any two summation orders would disagree by lr. An eps above the
# rounding noise (bf16's: gradients of ~1e-3 carry errors of ~1e-5) keeps the update a
# continuous function of the gradient.
ADAM_EPS = 1e-2


def global_batch() -> tuple[list, list[torch.Tensor]]:
    """4 micro-batches of 2 sequences, prompts of 3-6 tokens, responses of 0-10 tokens, each
    micro-batch padded to its own length; micro-batch 0 has per-token advantages; the second
    sequence of each is marked rephrased (provenance metrics). With each, the noise [2, s] to
    add to its reference log-probs."""
    from repo_megatron.trainer.micro_batch import MicroBatch

    g = torch.Generator().manual_seed(1)
    batches, noise = [], []
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
        noise.append(0.05 * torch.randn(MICRO_BATCH_SIZE, seq, generator=g))
        batches.append(MicroBatch(tokens=tokens, loss_mask=loss_mask.float(),
                                  advantages=advantages,
                                  # per-provenance metrics: a rephrased trace in every one
                                  provenance=torch.tensor([0, 1])))
    return batches, noise


def _train_in_layout(root: str, tp: int, pp: int, vpp, distributed_optimizer: bool,
                     layout: str):
    from megatron.core import parallel_state

    from repo_megatron.checkpoint.model_io import load_model, save_model
    from repo_megatron.config.model import ModelConfig
    from repo_megatron.config.parallel import ParallelConfig
    from repo_megatron.models.architecture import read_architecture
    from repo_megatron.models.builder import build_model
    from repo_megatron.runtime.distributed import initialize
    from repo_megatron.trainer.train_step import build_reference_model

    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                              virtual_pipeline_model_parallel_size=vpp)
    reference = layout == "tp1"
    initialize(parallel, seed=7 if reference else 99)  # only the checkpoint makes them agree
    dp, dp_rank = (parallel_state.get_data_parallel_world_size(),
                   parallel_state.get_data_parallel_rank())
    share = NUM_MICRO_BATCHES // dp
    mine = slice(dp_rank * share, (dp_rank + 1) * share)
    micro_batches, ref_noise = (part[mine] for part in global_batch())
    results = {}
    for mode in MODES:
        name = "tied" if mode in TIED else "untied"
        arch, model_cfg = read_architecture(os.path.join(root, name)), ModelConfig(
            transformer_impl="local")
        chunks = build_model(arch, model_cfg, parallel)
        init = os.path.join(root, "init", name)
        if reference and not os.path.exists(init):
            for p in (p for chunk in chunks for p in chunk.parameters()):
                p.data.copy_(p.data.to(torch.bfloat16))  # the bf16 run starts from the same
            save_model(chunks, init)
        load_model(chunks, init)
        reference_model = build_reference_model(arch, model_cfg, parallel, init)
        results[mode] = _two_steps(chunks, reference_model, micro_batches, ref_noise, mode,
                                   distributed_optimizer, os.path.join(root, layout, mode))
    # bf16 as the shipped configs run it: Float16Module, fp32 main params in the distributed
    # optimizer, fp32 gradient reduction; the log-probs and the loss in fp32.
    arch, model_cfg = read_architecture(os.path.join(root, "untied")), ModelConfig(
        transformer_impl="local", params_dtype="bf16")
    chunks = build_model(arch, model_cfg, parallel)
    init = os.path.join(root, "init", "untied")
    load_model(chunks, init)  # exact: the initial weights are bf16 numbers
    reference_model = build_reference_model(arch, model_cfg, parallel, init)
    with recorded_dtypes(chunks) as dtypes:
        results[BF16] = _two_steps(chunks, reference_model, micro_batches, ref_noise,
                                   "token-mean", True, os.path.join(root, layout, BF16),
                                   save_main_params=True)
    results[BF16]["dtypes"] = dtypes
    return results


def _two_steps(chunks: list, reference_model: list, micro_batches: list, ref_noise: list,
               mode: str, distributed_optimizer: bool, save_to: str,
               save_main_params: bool = False) -> dict:
    """Two optimizer steps on ``micro_batches``; saves the weights (and the distributed
    optimizer's fp32 main weights, in model space, if ``save_main_params``) to ``save_to``."""
    from repo_megatron.algorithm import LossParams
    from repo_megatron.checkpoint.model_io import save_model
    from repo_megatron.config.optimizer import OptimizerConfig
    from repo_megatron.trainer.forward import forward_logprobs
    from repo_megatron.trainer.train_step import PolicyTrainer

    trainer = PolicyTrainer(
        chunks, OptimizerConfig(lr=1e-2, clip_grad=CLIP_GRAD, adam_eps=ADAM_EPS,
                                use_distributed_optimizer=distributed_optimizer),
        LossParams(loss_agg_mode=mode, loss_norm_length=16, kl_coef=0.1, entropy_coef=0.01,
                   dual_clip=3.0), total_steps=2, temperature=TEMPERATURE)
    old = trainer.compute_logprobs(micro_batches)
    ref = forward_logprobs(reference_model, micro_batches, TEMPERATURE)
    # noise: the policy starts at the reference, so KL would vanish at the first step
    batch = [dataclasses.replace(mb, old_logprobs=o, ref_logprobs=r + noise)
             for mb, o, r, noise in zip(micro_batches, old, ref, ref_noise)]
    steps = [trainer.train_step(batch) for _ in range(2)]
    if save_main_params:
        save_with_main_params(chunks, trainer.optimizer, save_to)
    else:
        save_model(chunks, save_to)
    ref_after = forward_logprobs(reference_model, micro_batches, TEMPERATURE)
    return {"steps": [(s.loss, s.grad_norm, s.metrics) for s in steps],
            "reference_vs_old": max((r - o).abs().max().item() for r, o in zip(ref, old)),
            "reference_drift": max((a - r).abs().max().item() for a, r in zip(ref_after, ref)),
            "main_grad": sorted({str(p.main_grad.dtype) for c in trainer.model
                                 for p in c.parameters()})}


def save_with_main_params(chunks: list, optimizer, directory: str) -> None:
    """The weights and the distributed optimizer's state in model space
    (``optimizer.state.param.<weight>``: the fp32 main weights), as a torch_dist checkpoint."""
    from megatron.core import dist_checkpointing

    from repo_megatron.checkpoint.model_io import sharded_model_state

    model_state = sharded_model_state(chunks)
    state = {**model_state, "optimizer": optimizer.sharded_state_dict(
        model_state, metadata={"distrib_optim_sharding_type": "fully_reshardable"})}
    if torch.distributed.get_rank() == 0:
        os.makedirs(directory, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(state, directory)


@contextlib.contextmanager
def recorded_dtypes(chunks: list):
    """Records the dtypes along the log-prob and loss path of a training step: the output
    layer's logits, the log-probs and entropy from them, what the loss receives and returns."""
    from repo_megatron.trainer import loss as loss_module

    dtypes: dict[str, str] = {}
    # the training loss's log-probs (forward.next_token_logprobs, packed or not), not those of
    # the forward-only passes (old and reference log-probs)
    logprobs, policy_loss = loss_module.next_token_logprobs, loss_module.compute_policy_loss

    def recording_logprobs(logits, *args, **kwargs):
        logp, entropy = logprobs(logits, *args, **kwargs)
        dtypes.update(logits_to_logprobs=str(logits.dtype), logprobs=str(logp.dtype),
                      entropy=str(entropy.dtype))
        return logp, entropy

    def recording_loss(logp, old_logprobs, advantages, mask, **kwargs):
        loss, metrics = policy_loss(logp, old_logprobs, advantages, mask, **kwargs)
        dtypes.update(old_logprobs=str(old_logprobs.dtype), advantages=str(advantages.dtype),
                      ref_logprobs=str(kwargs["ref_logprobs"].dtype), loss=str(loss.dtype))
        return loss, metrics

    def record_output_layer(module, inputs, output):
        dtypes["output_layer"] = str(output[0].dtype)

    hooks = [c.output_layer.register_forward_hook(record_output_layer) for c in chunks
             if getattr(c, "post_process", False)]
    loss_module.next_token_logprobs, loss_module.compute_policy_loss = \
        recording_logprobs, recording_loss
    try:
        yield dtypes
    finally:
        loss_module.next_token_logprobs, loss_module.compute_policy_loss = \
            logprobs, policy_loss
        for hook in hooks:
            hook.remove()


def _global_params(directory: str) -> dict:
    return global_tensors(directory, directory + ".pt")


def _weights_and_main_params(directory: str) -> tuple[dict, dict]:
    """(weights, fp32 main weights) of a :func:`save_with_main_params` checkpoint, both keyed
    by the weight's name."""
    state = _global_params(directory)
    prefix = "optimizer.state.param."
    main = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return {k: v for k, v in state.items() if k in main}, main


def bf16_errors(root: str) -> dict:
    """``E`` of every parameter after the two steps: ``max |bf16 - fp32|`` of the TP=1 runs."""
    _, main = _weights_and_main_params(os.path.join(root, "tp1", BF16))
    exact = _global_params(os.path.join(root, "tp1", "token-mean"))
    return {k: (main[k] - exact[k]).abs().max().item() for k in exact}


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


def test_bf16_trains_in_bf16_with_fp32_logprobs_loss_and_main_params(reference):
    root, ref = reference
    run = ref[BF16]
    assert run["dtypes"] == {
        "output_layer": "torch.bfloat16",        # the model computes in bf16
        "logits_to_logprobs": "torch.float32",   # Float16Module hands the logits over in fp32
        "logprobs": "torch.float32", "entropy": "torch.float32",
        "old_logprobs": "torch.float32", "ref_logprobs": "torch.float32",
        "advantages": "torch.float32", "loss": "torch.float32"}
    assert run["main_grad"] == ["torch.float32"]  # gradients accumulate and reduce in fp32
    weights, main = _weights_and_main_params(os.path.join(root, "tp1", BF16))
    assert weights.keys() == main.keys() and weights
    for key, weight in weights.items():
        assert weight.dtype == torch.bfloat16 and main[key].dtype == torch.float32
        # the bf16 weights are the fp32 main weights, rounded
        assert torch.equal(weight, main[key].to(torch.bfloat16)), key
    init = _global_params(os.path.join(root, "init", "untied"))
    for key, error in bf16_errors(root).items():
        update = (main[key] - init[key]).abs().max().item()
        # bf16 rounds (E > 0) and its error is small next to what the two steps changed, so
        # the layouts' parameter comparison sees a wrong update
        assert 0 < error < 0.1 * update, f"{key}: bf16 error {error:.2e}, update {update:.2e}"


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
    # bf16 with the distributed optimizer: within bf16's rounding of bf16 at TP=1
    param_errors = bf16_errors(root)
    for rank, res in enumerate(results):
        run = res[BF16]
        assert run["reference_vs_old"] < 1e-6 and run["reference_drift"] == 0
        for step, ((loss, norm, _), (ref_loss, ref_norm, _)) in enumerate(
                zip(run["steps"], ref[BF16]["steps"]), start=1):
            where = f"{layout} bf16 rank {rank} step {step}"
            assert abs(loss - ref_loss) <= BF16_RESOLUTION * abs(ref_loss), \
                f"{where}: loss {loss} vs {ref_loss}"
            assert abs(norm - ref_norm) <= BF16_RESOLUTION * ref_norm, \
                f"{where}: grad norm {norm} vs {ref_norm}"
    _, ours = _weights_and_main_params(os.path.join(root, layout, BF16))
    _, theirs = _weights_and_main_params(os.path.join(root, "tp1", BF16))
    assert ours.keys() == theirs.keys() == param_errors.keys()
    for key, error in param_errors.items():
        diff = (ours[key] - theirs[key]).abs().max().item()
        assert diff <= bf16_layout_bound(error, tp), \
            f"{layout} bf16: main parameter {key} differs by {diff:.2e} (E = {error:.2e})"
