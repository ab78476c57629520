"""Tensor payloads are unpickled only through SGLang's allow-list: the remote-code payload of
issue 13 (``torch.storage._load_from_bytes`` -> ``torch.load(weights_only=False)``) and other
gadgets are refused, by our copy of SGLang's SafeUnpickler and by SGLang's own, and the payload
of a real update still loads. With the sglang wheel installed, serve uses SGLang's own
deserialiser, and our copy of the allow-list equals SGLang's."""

import base64
import functools
import io
import os
import pickle
import subprocess

import httpx
import pytest
import torch

from repo_megatron.engines.sglang_server import tensor_payload
from repo_megatron.weight_sync.flattened_bucket import bucket_payloads

from ..sglang.inprocess import serve_model
from .conftest import needs_sglang_wheel


class RunsShell:
    """Unpickling this runs a shell command: the harmless stand-in for an attack."""
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class LoadsNestedTorchPickle:
    """Issue 13's payload: a global under ``torch.*`` whose call unpickles inner bytes with
    ``torch.load(weights_only=False)``."""
    def __init__(self, inner: bytes):
        self.inner = inner

    def __reduce__(self):
        return torch.storage._load_from_bytes, (self.inner,)


class CallsGlobal:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def b64(obj) -> str:
    return base64.b64encode(pickle.dumps(obj)).decode()


def gadgets(marker: str) -> dict[str, str]:
    """Payloads that each touch ``marker`` if anything unpickles them unsafely."""
    touch = f"touch {marker}"
    inner = io.BytesIO()
    torch.save(RunsShell(touch), inner)
    return {
        "torch.storage._load_from_bytes": b64(LoadsNestedTorchPickle(inner.getvalue())),
        "os.system": b64(RunsShell(touch)),
        "builtins.exec": b64(CallsGlobal(exec, f"import os; os.system({touch!r})")),
        "subprocess.call": b64(CallsGlobal(subprocess.call, ["touch", marker])),
        # functools.partial is on SGLang's list; the callable it wraps is not
        "functools.partial(os.system)": b64(CallsGlobal(functools.partial(os.system, touch))),
    }


@pytest.fixture(params=["repo_megatron", "sglang"])
def deserializer(request, monkeypatch):
    """Our copy of SGLang's SafeUnpickler, then SGLang's own (skipped without the wheel)."""
    if request.param == "sglang":
        needs_sglang_wheel()
    else:
        monkeypatch.setattr(tensor_payload, "_sglang", lambda: None)
    assert tensor_payload.backend() == request.param
    return request.param


def test_the_issue_payload_would_run_a_command_when_unpickled_unsafely(tmp_path):
    # the control: the payload is live, so the refusals below are what stops it
    marker = tmp_path / "pwned"
    pickle.loads(base64.b64decode(gadgets(str(marker))["torch.storage._load_from_bytes"]))
    assert marker.exists()


@pytest.mark.parametrize("gadget", ["torch.storage._load_from_bytes", "os.system",
                                    "builtins.exec", "subprocess.call",
                                    "functools.partial(os.system)"])
def test_remote_code_payloads_are_refused(deserializer, gadget, tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(tensor_payload.PayloadError):
        tensor_payload.deserialize(gadgets(str(marker))[gadget])
    assert not marker.exists()


def test_a_flattened_bucket_from_our_client_loads(deserializer):
    bucket = [("q.weight", torch.randn(3, 4)), ("norm.weight", torch.randn(4)),
              ("step", torch.arange(3))]
    rebuilt = [pair for text in bucket_payloads(bucket)      # one flattened tensor per dtype
               for pair in tensor_payload.named_tensors(tensor_payload.deserialize(text),
                                                        "flattened_bucket")]
    assert [n for n, _ in rebuilt] == ["q.weight", "norm.weight", "step"]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(bucket, rebuilt))
    pairs = tensor_payload.named_tensors(tensor_payload.deserialize(b64(bucket)), None)
    assert [n for n, _ in pairs] == ["q.weight", "norm.weight", "step"]


def test_malformed_payloads_are_payload_errors(deserializer):
    for entry in ("not base64!", b64({"flattened_tensor": 3}), b64([("a", 1)]), 17,
                  base64.b64encode(b"\x80\x04garbage").decode()):
        with pytest.raises(tensor_payload.PayloadError):
            payload = tensor_payload.deserialize(entry)
            tensor_payload.named_tensors(payload, "flattened_bucket" if isinstance(
                payload, dict) else None)


def test_our_allow_list_is_sglangs():
    needs_sglang_wheel()
    from sglang.srt.utils.common import SafeUnpickler

    assert tensor_payload.SGLANG_ALLOWED_GLOBALS == SafeUnpickler.ALLOWED_GLOBALS


def test_serve_deserialises_with_sglangs_own_code_when_installed(model_dir, monkeypatch):
    needs_sglang_wheel()
    from sglang.srt.utils import MultiprocessingSerializer

    calls = []
    original = MultiprocessingSerializer.deserialize
    monkeypatch.setattr(MultiprocessingSerializer, "deserialize",
                        staticmethod(lambda data: calls.append(1) or original(data)))
    with serve_model(model_dir, version="0.5.8") as (url, _):
        name = "model.norm.weight"
        answer = httpx.post(url + "/update_weights_from_tensor", json={
            "serialized_named_tensors": bucket_payloads([(name, torch.ones(64))]),
            "load_format": "flattened_bucket"}, timeout=60)
    assert answer.status_code == 200, answer.text
    assert calls == [1]


def test_the_remote_code_payload_over_http_is_a_400_and_runs_nothing(model_dir, tmp_path):
    marker = tmp_path / "pwned"
    with serve_model(model_dir, version="0.5.8") as (url, server):
        before = server.worker.engine.model.model.norm.weight.clone()
        for gadget, entry in gadgets(str(marker)).items():
            answer = httpx.post(url + "/update_weights_from_tensor",
                                json={"serialized_named_tensors": [entry]}, timeout=60)
            assert answer.status_code == 400, gadget
            assert answer.json()["success"] is False
            assert "Failed to deserialize" in answer.json()["message"]
        assert torch.equal(before, server.worker.engine.model.model.norm.weight)
        # the browser path of the issue: the same request as text/plain never reaches it
        answer = httpx.post(url + "/update_weights_from_tensor", content=b'{"x": 1}',
                            headers={"content-type": "text/plain"}, timeout=60)
        assert answer.status_code == 400
    assert not marker.exists()
