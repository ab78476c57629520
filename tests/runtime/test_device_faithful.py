"""The device-faithful mode's rules, each checked where CUDA and NCCL would raise (or not).

All scenarios run in one spawned process (the mode is process-wide and stays on), on a
one-rank gloo world; each test reads the outcome of its scenarios: the error text, or None."""

import pytest

from tests.distributed import run_distributed


def _scenarios() -> dict:
    import torch
    import torch.distributed as dist

    from repo_megatron.runtime import cpu_compat
    from repo_megatron.runtime.device_faithful import DEVICE, DevicePlacementError

    cpu_compat.enable(device_faithful=True)
    dist.init_process_group("gloo")
    dev, host = cpu_compat.device(), torch.ones(2, 3)
    out = {}

    def attempt(name, fn):
        try:
            out[name] = ("ok", fn())
        except DevicePlacementError as e:
            out[name] = ("raised", str(e))

    x = torch.ones(2, 3, device=dev)

    def mismatch_in_our_code():
        return float((x - host).sum())        # what session.py did at step 1 of a GPU run
    attempt("mix", mismatch_in_our_code)
    attempt("scalar", lambda: (x * torch.tensor(2.0)) in DEVICE)
    attempt("copy_to_host", lambda: (host.clone().copy_(x) in DEVICE, x.clone().copy_(host) in DEVICE))
    attempt("host_index", lambda: x[torch.tensor([1])] in DEVICE)
    attempt("placement", lambda: (str(x.device), x.is_cuda, x.get_device(), x.type(),
                                  str(host.device), host.type()))
    attempt("cpu_copy", lambda: (x.cpu() in DEVICE, x.to("cpu") in DEVICE,
                                 x.cpu().untyped_storage()._cdata == x.untyped_storage()._cdata))
    moved = host.to(dev)
    attempt("to_device_copies", lambda: (moved in DEVICE, moved.untyped_storage()._cdata
                                         == host.untyped_storage()._cdata, host in DEVICE))
    attempt("numpy", lambda: x.numpy())

    w = torch.randn(3, device=dev, requires_grad=True)

    def backward():
        (w * w).sum().backward()
        return w.grad in DEVICE
    attempt("backward", backward)
    linear = torch.nn.Linear(3, 2).to(dev)
    attempt("module_params", lambda: all(p in DEVICE for p in linear.parameters()))
    attempt("module_host_input", lambda: linear(host))
    attempt("data_plane_host", lambda: dist.all_reduce(torch.ones(2)))
    attempt("data_plane_device", lambda: dist.all_reduce(torch.ones(2, device=dev)) is None)
    gloo = dist.new_group(backend="gloo")
    attempt("control_plane_device", lambda: dist.all_reduce(torch.ones(2, device=dev), group=gloo))
    attempt("control_plane_host", lambda: dist.all_reduce(torch.ones(2), group=gloo) is None)
    attempt("backends", lambda: (dist.get_backend(), dist.get_backend(gloo)))
    attempt("objects", lambda: dist.broadcast_object_list([{"step": 1}]) is None)
    return out


@pytest.fixture(scope="module")
def outcomes():
    (result,) = run_distributed(_scenarios, 1, timeout=240)
    return result


def test_device_faithful_mixing_host_and_device_raises_naming_op_and_call_site(outcomes):
    status, message = outcomes["mix"]
    assert status == "raised"
    assert "aten.sub.Tensor mixes a device tensor [2, 3] float32 with a host tensor [2, 3]" \
        in message
    assert "test_device_faithful.py" in message and "mismatch_in_our_code" in message
    assert outcomes["module_host_input"][0] == "raised"   # a host batch into a device model


def test_device_faithful_admits_what_cuda_admits(outcomes):
    assert outcomes["scalar"] == ("ok", True)             # a 0-dim host tensor is a scalar
    assert outcomes["copy_to_host"] == ("ok", (False, True))  # copy_ crosses, keeps its side
    assert outcomes["host_index"] == ("ok", True)          # host index tensors


def test_device_faithful_tensors_report_a_gpu(outcomes):
    assert outcomes["placement"] == ("ok", ("cuda:0", True, 0, "torch.cuda.FloatTensor",
                                            "cpu", "torch.FloatTensor"))
    assert outcomes["numpy"][0] == "raised"


def test_device_faithful_moves_copy_like_a_gpu(outcomes):
    assert outcomes["cpu_copy"] == ("ok", (False, False, False))
    assert outcomes["to_device_copies"] == ("ok", (True, False, False))


def test_device_faithful_autograd_and_modules_stay_on_the_device(outcomes):
    assert outcomes["backward"] == ("ok", True)
    assert outcomes["module_params"] == ("ok", True)


def test_device_faithful_data_plane_takes_device_tensors_only(outcomes):
    status, message = outcomes["data_plane_host"]
    assert status == "raised" and "all_reduce on a data-plane group (NCCL on a GPU) gets a " \
        "host tensor [2] float32" in message
    assert outcomes["data_plane_device"] == ("ok", True)
    assert outcomes["backends"] == ("ok", ("nccl", "gloo"))


def test_device_faithful_control_plane_takes_host_tensors_only(outcomes):
    status, message = outcomes["control_plane_device"]
    assert status == "raised" and "on a gloo (control-plane) group gets a device tensor" in message
    assert outcomes["control_plane_host"] == ("ok", True)
    assert outcomes["objects"] == ("ok", True)             # object collectives place their own
