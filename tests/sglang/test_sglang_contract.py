"""What our client sends, judged by SGLang's own code (the sglang wheel, run in a process of its
own by :mod:`.sglang_oracle`): every request body parses into the request class SGLang's HTTP
server gives its route, with no field SGLang would drop; every ``serialized_named_tensors``
entry loads through SGLang's ``SafeUnpickler`` and rebuilds, with SGLang's
``FlattenedTensorBucket``, into exactly the tensors we sent. Negative controls show the judge
can fail. scripts/install.sh installs the wheel; without it these tests skip and say so."""

import importlib.util
import json
import os
import pickle
import subprocess
import sys
import types

import pytest
import torch
from safetensors.torch import load_file

from repo_megatron.config.rollout import SGLangConfig
from repo_megatron.engines.base import SamplingParams
from repo_megatron.engines.sglang import SGLangEngine
from repo_megatron.engines.sglang import protocol
from repo_megatron.weight_sync.flattened_bucket import bucket_payloads

from .servers import RecordingWorker, free_ports, serve_in_thread

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.skipif(importlib.util.find_spec("sglang") is None,
                                reason="needs the sglang wheel (scripts/install.sh installs it "
                                       "with --no-deps)")

MIXED = [("model.layers.0.self_attn.q_proj.weight", torch.randn(8, 4)),
         ("model.norm.weight", torch.randn(4).to(torch.bfloat16)),
         ("lm_head.weight", torch.randn(5, 4)),
         ("model.layers.0.mlp.gate_proj.weight", torch.randn(6, 4).to(torch.float16))]


class Foreign:
    """A class SGLang's SafeUnpickler must refuse (the negative control)."""


# (version changes a request saw: (old version, tokens by then)), version at its end, tokens
SPAN_CASES = [
    {"events": [], "current": "default", "tokens": 7},
    {"events": [], "current": "3", "tokens": 0},                       # aborted before a token
    {"events": [["default", 4]], "current": "1", "tokens": 9},         # one update mid-request
    {"events": [["default", 4], ["1", 4], ["2", 6]], "current": "3", "tokens": 9},
    {"events": [["default", 4]], "current": "default", "tokens": 9},   # changed back
    {"events": [["1", 5]], "current": "2", "tokens": 5},               # finished at the change
    {"events": [["1", 8]], "current": "2", "tokens": 5},               # stop trimmed tokens
]


def recorded_flows(tmp_path) -> list[tuple[str, object]]:
    """Every control and weight request of full updates (tensor with memory release, disk),
    an abort, against a recording worker with engine TP 2."""
    worker = RecordingWorker(tp_size=2)
    with serve_in_thread(worker.app(), free_ports(1)) as url:
        with SGLangEngine(SGLangConfig(urls=[url], weight_sync="tensor")) as engine:
            engine.release_memory()
            engine.update_weights(MIXED)
            engine.abort()
        with SGLangEngine(SGLangConfig(urls=[url], weight_sync="disk",
                                       disk_dir=str(tmp_path / "disk"))) as engine:
            engine.update_weights(MIXED)
    return worker.calls


def built_bodies() -> list[tuple[str, dict]]:
    """Bodies of requests a recording worker cannot take part in (a process group) and of
    /generate, built by the same functions the client uses."""
    from repo_megatron.weight_sync.distributed import group_name

    params = SamplingParams(temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=8,
                            stop=("</s>",), stop_token_ids=(5,), seed=123)
    return [
        ("/generate", protocol.generate_body([1, 2, 3], params)),
        ("/generate", protocol.generate_body([4], SamplingParams(temperature=0.0), rid="r1")),
        ("/init_weights_update_group", protocol.init_group_body(
            "10.0.0.1", 29500, 1, 9, group_name(3), "nccl")),
        ("/update_weights_from_distributed", protocol.distributed_update_body(
            [n for n, _ in MIXED], [t.dtype for _, t in MIXED], [t.shape for _, t in MIXED],
            group_name(0))),
        ("/destroy_weights_update_group", protocol.destroy_group_body(group_name(0))),
        *[("/pause_generation", protocol.pause_body(m)) for m in ("abort", "retract", "in_place")],
    ]


@pytest.fixture(scope="module")
def judged(tmp_path_factory):
    """(cases, SGLang's verdicts, output dir, header) of one oracle run over everything."""
    tmp = tmp_path_factory.mktemp("sglang_contract")
    calls = recorded_flows(tmp)
    requests = [(e, b) for e, b in calls if e != "/flush_cache"] + built_bodies()
    flushes = [b for e, b in calls if e == "/flush_cache"]
    tensor_entries = [entry for e, b in calls if e == "/update_weights_from_tensor"
                      for entry in b["serialized_named_tensors"]]
    foreign = __import__("base64").b64encode(pickle.dumps(
        {"flattened_tensor": torch.zeros(1), "metadata": [types.SimpleNamespace()],
         "x": Foreign()})).decode()
    cases = ([{"endpoint": e, "body": b} for e, b in requests]
             + [{"endpoint": "/update_weight_version",
                 "body": {**protocol.weight_version_body(1), "flush": True}}]  # control
             + [{"payload": entry} for entry in tensor_entries]
             + [{"payload": foreign}])                                       # control
    with open(tmp / "cases.json", "w") as f:
        json.dump(cases + [{"weight_versions": c} for c in SPAN_CASES], f)
    run = subprocess.run([sys.executable, "-m", "tests.sglang.sglang_oracle",
                          str(tmp / "cases.json"), str(tmp)], cwd=ROOT, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    header, verdicts = lines[0], lines[1:]
    assert len(verdicts) == len(cases) + len(SPAN_CASES)
    return {"cases": cases, "verdicts": verdicts[:len(cases)], "header": header,
            "flushes": flushes, "requests": requests, "entries": tensor_entries,
            "spans": verdicts[len(cases):]}


def test_the_judge_is_the_sglang_wheel(judged):
    assert judged["header"]["sglang"] == "0.5.23"
    assert judged["header"]["routes"] > 20


def test_every_request_body_parses_into_sglangs_request_class(judged):
    endpoints = {e for e, _ in judged["requests"]}
    assert {"/pause_generation", "/begin_weight_update", "/update_weights_from_tensor",
            "/end_weight_update", "/update_weight_version", "/continue_generation",
            "/release_memory_occupation", "/resume_memory_occupation", "/abort_request",
            "/update_weights_from_disk", "/generate", "/init_weights_update_group",
            "/update_weights_from_distributed", "/destroy_weights_update_group"} <= endpoints
    n = len(judged["requests"])
    for case, verdict in zip(judged["cases"][:n], judged["verdicts"][:n]):
        assert verdict["ok"], (case["endpoint"], case["body"], verdict)


def test_flush_cache_is_sent_without_a_body(judged):
    assert judged["flushes"] and all(body is None for body in judged["flushes"])


def test_a_field_sglang_would_drop_is_caught(judged):
    n = len(judged["requests"])
    verdict = judged["verdicts"][n]
    assert not verdict["ok"] and verdict["unknown_fields"] == ["flush"]


def test_every_tensor_payload_loads_and_rebuilds_with_sglangs_own_classes(judged, tmp_path):
    n = len(judged["requests"]) + 1
    entries = judged["entries"]
    # engine TP 2: one entry per TP rank in every request, each a complete bucket
    assert len(entries) == 2 * len(bucket_payloads(MIXED))
    rebuilt = {}
    for verdict in judged["verdicts"][n:n + len(entries)]:
        assert verdict["ok"], verdict
        rebuilt.update(load_file(verdict["file"]))
    assert set(rebuilt) == {name for name, _ in MIXED}
    for name, tensor in MIXED:
        assert rebuilt[name].dtype == tensor.dtype and torch.equal(rebuilt[name], tensor), name


def test_sglangs_unpickler_refuses_a_foreign_class(judged):
    verdict = judged["verdicts"][-1]
    assert not verdict["ok"] and "Blocked unsafe global" in verdict["error"]


def test_weight_versions_of_a_response_across_updates_are_sglangs(judged):
    from repo_megatron.engines.sglang_server.app import weight_version_spans

    for case, verdict in zip(SPAN_CASES, judged["spans"]):
        want = verdict["meta_info"]
        got = weight_version_spans([tuple(e) for e in case["events"]], case["current"],
                                   case["tokens"])
        assert got == want["weight_versions"], case
        assert got[-1]["version"] == want["weight_version"], case
