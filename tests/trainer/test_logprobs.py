"""Vocab-parallel log-probs and entropy at TP=2 equal a float64 one-process log_softmax,
in values and in gradients (real TP on gloo, several token chunks, a mask, a temperature)."""

import pytest
import torch

from tests.distributed import run_distributed

VOCAB, TEMPERATURE = 96, 0.7
REAL_VOCAB = 76  # the last 20 columns play Megatron's vocabulary padding (rank 1: 28 real)


def _inputs():
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(3, 7, VOCAB, generator=g, dtype=torch.float64)
    targets = torch.randint(0, VOCAB, (3, 7), generator=g)
    mask = torch.rand(3, 7, generator=g) < 0.7
    grad_logp = torch.randn(3, 7, generator=g, dtype=torch.float64)
    grad_entropy = torch.randn(3, 7, generator=g, dtype=torch.float64)
    return logits, targets, mask, grad_logp, grad_entropy


def _reference(logits, targets, mask, grad_logp, grad_entropy):
    """float64 log_softmax over the full vocabulary: values and d(loss)/d(logits) for the
    losses sum(g_logp logp), sum(g_H H) and their sum."""
    logits = logits.clone().requires_grad_(True)
    logp_all = torch.log_softmax(logits / TEMPERATURE, dim=-1)
    logp = logp_all.gather(-1, targets[..., None])[..., 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    out = {"logp": logp.detach(), "entropy": entropy.detach()}
    for name, loss in (("logp", (grad_logp * logp)[mask].sum()),
                       ("entropy", (grad_entropy * entropy)[mask].sum())):
        out[f"grad_{name}"] = torch.autograd.grad(loss, logits, retain_graph=True)[0]
    return out


def _tp2_logprobs():
    from megatron.core import parallel_state, tensor_parallel

    from repo_megatron.config.parallel import ParallelConfig
    from repo_megatron.runtime.distributed import initialize
    from repo_megatron.trainer.logprobs import vocab_parallel_logprobs

    initialize(ParallelConfig(tensor_model_parallel_size=2))
    rank = parallel_state.get_tensor_model_parallel_rank()
    logits, targets, mask, grad_logp, grad_entropy = _inputs()
    shard = logits[..., rank * VOCAB // 2:(rank + 1) * VOCAB // 2].float()  # [b, s, v/tp]
    # 3 tokens of 48 fp32 logits per chunk: 5 chunks over the 14 or so masked tokens.
    chunk_bytes = 3 * 4 * VOCAB // 2
    out = {}
    for name, g in (("logp", grad_logp), ("entropy", grad_entropy)):
        local = shard.clone().requires_grad_(True)
        logp, entropy = vocab_parallel_logprobs(local, targets, TEMPERATURE, mask, chunk_bytes)
        value = logp if name == "logp" else entropy
        (g.float() * value)[mask].sum().backward()
        out[name] = value.detach()
        out[f"grad_{name}"] = local.grad
    # vocabulary padding: columns >= REAL_VOCAB take no probability mass and get no gradient
    local = shard.clone().requires_grad_(True)
    real_targets = targets % REAL_VOCAB
    logp, entropy = vocab_parallel_logprobs(local, real_targets, TEMPERATURE, mask, chunk_bytes,
                                            vocab_size=REAL_VOCAB)
    (grad_logp.float() * logp + grad_entropy.float() * entropy)[mask].sum().backward()
    out["padded"] = (logp.detach(), entropy.detach(), local.grad)
    # megatron's own cross entropy on the same shard (its full [s, b, v/tp] path)
    out["megatron_logp"] = -tensor_parallel.vocab_parallel_cross_entropy(
        (shard / TEMPERATURE).transpose(0, 1).contiguous(), targets.t().contiguous()).t()
    # bf16 logits (the GPU path): fp32 maths, bf16 gradient
    bf16 = shard.bfloat16().requires_grad_(True)
    logp, entropy = vocab_parallel_logprobs(bf16, targets, TEMPERATURE, mask)
    (logp + entropy)[mask].sum().backward()
    out["bf16"] = (logp.dtype, bf16.grad.dtype, logp.detach(), entropy.detach())
    return rank, out


@pytest.fixture(scope="module")
def tp2_results():
    return run_distributed(_tp2_logprobs, 2)


def test_tp2_logprobs_and_entropy_match_float64_log_softmax(tp2_results):
    logits, targets, mask, grad_logp, grad_entropy = _inputs()
    ref = _reference(logits, targets, mask, grad_logp, grad_entropy)
    for rank, out in tp2_results:
        for name in ("logp", "entropy"):
            diff = (out[name].double() - ref[name])[mask].abs().max().item()
            assert diff < 1e-6, f"rank {rank} {name}: max diff {diff:.2e}"
            assert (out[name][~mask] == 0).all(), "positions outside the mask must be 0"


def test_tp2_gradients_match_float64_log_softmax(tp2_results):
    logits, targets, mask, grad_logp, grad_entropy = _inputs()
    ref = _reference(logits, targets, mask, grad_logp, grad_entropy)
    for rank, out in tp2_results:
        cols = slice(rank * VOCAB // 2, (rank + 1) * VOCAB // 2)
        for name in ("grad_logp", "grad_entropy"):
            diff = (out[name].double() - ref[name][..., cols]).abs().max().item()
            assert diff < 1e-6, f"rank {rank} {name}: max diff {diff:.2e}"


def test_logprobs_equal_megatron_vocab_parallel_cross_entropy(tp2_results):
    _, _, mask, _, _ = _inputs()
    for rank, out in tp2_results:
        diff = (out["logp"] - out["megatron_logp"])[mask].abs().max().item()
        assert diff < 1e-6, f"rank {rank}: max diff {diff:.2e}"


def test_bf16_logits_give_fp32_logprobs_and_bf16_gradients(tp2_results):
    _, _, mask, _, _ = _inputs()
    for _, out in tp2_results:
        logp_dtype, grad_dtype, logp, entropy = out["bf16"]
        assert (logp_dtype, grad_dtype) == (torch.float32, torch.bfloat16)
        assert (logp - out["logp"])[mask].abs().max() < 0.05  # bf16 rounding of the logits
        assert (entropy - out["entropy"])[mask].abs().max() < 0.05


def test_vocabulary_padding_gets_no_probability(tp2_results):
    logits, targets, mask, grad_logp, grad_entropy = _inputs()
    real = logits[..., :REAL_VOCAB].clone().requires_grad_(True)
    logp_all = torch.log_softmax(real / TEMPERATURE, dim=-1)
    logp = logp_all.gather(-1, (targets % REAL_VOCAB)[..., None])[..., 0]
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    (grad_logp * logp + grad_entropy * entropy)[mask].sum().backward()
    for rank, out in tp2_results:
        got_logp, got_entropy, got_grad = out["padded"]
        assert (got_logp.double() - logp.detach())[mask].abs().max() < 1e-6, rank
        assert (got_entropy.double() - entropy.detach())[mask].abs().max() < 1e-6, rank
        lo = rank * VOCAB // 2
        expected = torch.zeros(3, 7, VOCAB // 2, dtype=torch.float64)
        width = max(0, min(REAL_VOCAB - lo, VOCAB // 2))
        expected[..., :width] = real.grad[..., lo:lo + width]
        assert (got_grad.double() - expected).abs().max() < 1e-6, rank
