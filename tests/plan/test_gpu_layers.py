"""The measured model's stand-ins for the GPU kernels compute the real thing and keep what the
fused kernels keep."""

import pytest
import torch
import torch.nn.functional as F

from repo_megatron.plan.gpu_layers import _FlashAttention, _RMSNormFunction
from repo_megatron.plan.tracker import StorageTracker

META = torch.device("meta")


def test_rms_norm_equals_torch_forward_and_backward():
    torch.manual_seed(0)
    x = torch.randn(32, 3, 64, dtype=torch.float64, requires_grad=True)
    w = torch.randn(64, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(32, 3, 64, dtype=torch.float64)
    ours = _RMSNormFunction.apply(x, w, 1e-5)
    (dx, dw) = torch.autograd.grad(ours, (x, w), grad)
    reference = F.rms_norm(x, (64,), w, 1e-5)
    (rx, rw) = torch.autograd.grad(reference, (x, w), grad)
    torch.testing.assert_close(ours, reference)
    torch.testing.assert_close(dx, rx)
    torch.testing.assert_close(dw, rw)


def test_rms_norm_makes_its_output_and_one_fp32_value_per_token_and_nothing_else():
    x = torch.empty(512, 1, 8192, dtype=torch.bfloat16, device=META, requires_grad=True)
    w = torch.empty(8192, dtype=torch.bfloat16, device=META, requires_grad=True)
    out_bytes, rstd_bytes = 512 * 8192 * 2, 512 * 4
    with StorageTracker(META) as tracker:
        tracker.track([x, w], "inputs")
        out = _RMSNormFunction.apply(x, w, 1e-5)
        # the output and 1/rms [512, 1, 1] in fp32 (its fp32 arithmetic is the kernel's)
        assert tracker.peak.bytes - tracker.by_tag["inputs"] == out_bytes + rstd_bytes
        out.backward(torch.empty_like(out))
        # the backward: the output's gradient given to it, and the two gradients it makes
        assert tracker.peak.bytes - tracker.by_tag["inputs"] == \
            out_bytes + rstd_bytes + out_bytes + out_bytes + 8192 * 2


@pytest.mark.parametrize("heads,groups", [(4, 4), (8, 2)], ids=["mha", "gqa"])
def test_flash_attention_equals_causal_sdpa_forward_and_backward(heads, groups):
    torch.manual_seed(0)
    q = torch.randn(2, heads, 24, 16, requires_grad=True)
    k = torch.randn(2, groups, 24, 16, requires_grad=True)
    v = torch.randn(2, groups, 24, 16, requires_grad=True)
    grad = torch.randn(2, heads, 24, 16)
    ours = _FlashAttention.apply(q, k, v, 0.25)
    got = torch.autograd.grad(ours, (q, k, v), grad)
    reference = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25,
                                               enable_gqa=True)
    expected = torch.autograd.grad(reference, (q, k, v), grad)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_flash_attention_keeps_grouped_k_v_and_the_log_sum_exp():
    b, heads, groups, s, d = 1, 8, 1, 4096, 128
    q = torch.empty(b, heads, s, d, dtype=torch.bfloat16, device=META, requires_grad=True)
    k = torch.empty(b, groups, s, d, dtype=torch.bfloat16, device=META, requires_grad=True)
    v = torch.empty(b, groups, s, d, dtype=torch.bfloat16, device=META, requires_grad=True)
    with StorageTracker(META) as tracker:
        tracker.track([q, k, v], "inputs")
        out = _FlashAttention.apply(q, k, v, 0.1)
        # made: the output [b, heads, s, d] and the fp32 log-sum-exp [b, heads, s]; K and V
        # expanded to 8 heads are the kernel's scratch (TE's reads the KV groups)
        assert tracker.peak.bytes - tracker.by_tag["inputs"] == \
            out.untyped_storage().nbytes() + b * heads * s * 4
