"""``cpu_compat.cuda_redirected_to``: CUDA placement requests land on the meta device inside the
block (a full-size rank without memory), and torch.cuda is as it was afterwards."""

import pytest
import torch

from repo_megatron.runtime import cpu_compat

META = torch.device("meta")


def test_cuda_requests_land_on_the_target_inside_and_nowhere_after():
    before = {name: getattr(torch.cuda, name) for name in cpu_compat._PATCHED}
    device_before = cpu_compat.device()
    with cpu_compat.cuda_redirected_to(META):
        assert torch.empty(3, device="cuda").device == META
        assert torch.zeros(2, device=torch.cuda.current_device()).device == META
        assert torch.ones(2).cuda().device == META
        assert torch.ones(2).to("cuda:0").device == META
        assert cpu_compat.device() == META
        assert torch.empty(2).device.type == "cpu"          # no device: the CPU, as beside a GPU
        # the distributed optimizer's type check sees a CUDA tensor
        assert torch.empty(2, dtype=torch.bfloat16, device=META).type() == \
            "torch.cuda.BFloat16Tensor"
        torch.cuda.synchronize()                             # no GPU needed
        with pytest.raises(RuntimeError, match="already redirected"):
            with cpu_compat.cuda_redirected_to(META):
                pass
    assert {name: getattr(torch.cuda, name) for name in cpu_compat._PATCHED} == before
    assert cpu_compat.device() == device_before
