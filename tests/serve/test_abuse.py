"""``repo-megatron serve`` under abuse, over HTTP: every client mistake of issue 13 is a 400 in
SGLang's error shape (never a 500) and costs its batch-mates nothing; an aborted request
leaves the engine after its next token, as does one whose client goes away; a failing request
fails alone; process groups join only allowed hosts; tensors are allocated only for the
model's own parameters."""

import asyncio
import json
import threading
import time

import httpx
import pytest
import torch

from repo_megatron.engines.sglang_server.app import ServeOptions

from ..sglang.inprocess import serve_model
from .bodies import MISTAKES, SERVED, SERVER_MAX_NEW_TOKENS

OPTIONS = ServeOptions(max_new_tokens=SERVER_MAX_NEW_TOKENS)
GOOD = {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 4, "temperature": 0}}


@pytest.fixture(scope="module")
def served(model_dir):
    with serve_model(model_dir, options=OPTIONS) as (url, server):
        yield url, server


@pytest.fixture(scope="module")
def long_server(model_dir):
    """A server whose requests may run to the context (for abort and disconnect)."""
    with serve_model(model_dir) as (url, server):
        yield url, server


async def post_all(url: str, bodies: list) -> list[httpx.Response]:
    """POST every body at once (Python's JSON, so NaN and Infinity go out as written)."""
    async with httpx.AsyncClient(timeout=120) as client:
        return await asyncio.gather(*(client.post(
            url + "/generate", content=json.dumps(b),
            headers={"content-type": "application/json"}) for b in bodies))


def test_every_client_mistake_is_a_400_and_its_batch_mates_are_served(served):
    url, _ = served
    answers = asyncio.run(post_all(url, [GOOD] + [b for _, b in MISTAKES] + [GOOD]))
    first, *refused, last = answers
    for (case, _), answer in zip(MISTAKES, refused):
        assert answer.status_code == 400, (case, answer.status_code, answer.text)
        assert answer.json()["error"]["message"], case
    assert first.status_code == last.status_code == 200
    assert first.json()["output_ids"] == last.json()["output_ids"]
    assert len(first.json()["output_ids"]) == 4


@pytest.mark.parametrize("case,body,expected", SERVED, ids=[c for c, _, _ in SERVED])
def test_what_sglang_serves_is_served(served, case, body, expected):
    answer = httpx.post(served[0] + "/generate", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    meta = answer.json()["meta_info"]
    assert meta["completion_tokens"] == expected["completion_tokens"], meta
    assert all(lp[0] == lp[0] for lp in meta["output_token_logprobs"])     # no NaN


def test_a_rid_already_in_flight_is_refused(long_server):
    url, server = long_server
    body = {"input_ids": [1, 2], "rid": "twice", "sampling_params": {"max_new_tokens": 300}}
    first = threading.Thread(target=httpx.post, args=(url + "/generate",),
                             kwargs={"json": body, "timeout": 120})
    first.start()
    while not server.worker.running:
        time.sleep(0.005)
    answer = httpx.post(url + "/generate", json=body, timeout=60)
    assert answer.status_code == 400 and "Duplicate request ID" in answer.text
    httpx.post(url + "/abort_request", json={"rid": "twice"})
    first.join()


class ForwardCounter:
    """Counts the model's forward passes (one per decoded token after the prefill)."""
    def __init__(self, model):
        self.calls = 0
        self.handle = model.register_forward_hook(self.hook)

    def hook(self, *_):
        self.calls += 1


def test_an_aborted_request_stops_decoding_at_its_next_token(long_server):
    url, server = long_server
    counter = ForwardCounter(server.worker.engine.model)
    answer: dict = {}
    body = {"input_ids": [1, 2], "rid": "long", "sampling_params": {"max_new_tokens": 500}}
    request = threading.Thread(target=lambda: answer.update(
        httpx.post(url + "/generate", json=body, timeout=120).json()))
    try:
        request.start()
        while counter.calls < 5:                          # decoding is under way
            time.sleep(0.001)
        assert httpx.post(url + "/abort_request", json={"rid": "long"}).status_code == 200
        at_abort = counter.calls
        request.join(30)
        while server.worker.running:                       # the engine gives the batch up
            time.sleep(0.001)
        assert counter.calls - at_abort <= 2, (at_abort, counter.calls)
    finally:
        counter.handle.remove()
    assert answer["meta_info"]["finish_reason"]["type"] == "abort"


def test_a_client_that_goes_away_stops_its_generation(long_context_model_dir):
    # 16000 greedy tokens of the 16k-context copy take far longer than the client waits
    # (500 tokens of the 512-context model can finish within the client's 0.5 s on a fast CPU)
    with serve_model(long_context_model_dir) as (url, server):
        counter = ForwardCounter(server.worker.engine.model)
        try:
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(url + "/generate", json={"input_ids": [1, 2], "sampling_params": {
                    "max_new_tokens": 16000, "temperature": 0}}, timeout=0.5)
            deadline = time.monotonic() + 30
            while server.worker.running and time.monotonic() < deadline:
                time.sleep(0.01)
            assert not server.worker.running
            assert counter.calls < 8000     # it stopped far short of its 16000 tokens
        finally:
            counter.handle.remove()


def test_a_request_that_breaks_the_engine_fails_alone(served, monkeypatch):
    url, server = served
    engine = server.worker.engine
    original = engine.forward

    def breaks_on_prompt_7(cache=None, **inputs):
        ids = inputs["input_ids"]                  # [rows, width]: a prefill when width > 1
        if ids.shape[1] > 1 and bool((ids == 7).any()):
            raise RuntimeError("engine fault on token 7")
        return original(cache, **inputs)

    monkeypatch.setattr(engine, "forward", breaks_on_prompt_7)
    bad = {"input_ids": [7, 7], "sampling_params": {"max_new_tokens": 2}}
    answers = asyncio.run(post_all(url, [GOOD, bad, GOOD, GOOD]))
    assert [a.status_code for a in answers] == [200, 500, 200, 200]
    assert "engine fault on token 7" in answers[1].json()["error"]["message"]


def test_process_groups_join_only_allowed_hosts(served):
    url, server = served
    answer = httpx.post(url + "/init_weights_update_group", json={
        "master_address": "203.0.113.9", "master_port": 29500, "rank_offset": 1,
        "world_size": 2, "group_name": "g", "backend": "gloo"}, timeout=30)
    assert answer.status_code == 400 and "--weight-sync-hosts" in answer.text
    assert server.groups == {}
    for bad in ({"master_port": 0}, {"rank_offset": 2}, {"backend": "mpi"},
                {"world_size": "2"}):
        body = {"master_address": "127.0.0.1", "master_port": 29500, "rank_offset": 1,
                "world_size": 2, "backend": "gloo", **bad}
        assert httpx.post(url + "/init_weights_update_group", json=body).status_code == 400


def test_distributed_updates_allocate_only_the_models_own_parameters(served, monkeypatch):
    url, server = served
    server.groups["g"] = object()       # a joined group (never reached: the body is refused)
    monkeypatch.setattr(torch, "empty", lambda *a, **k: pytest.fail("allocated a tensor"))
    try:
        for names, dtypes, shapes in (
                (["model.norm.weight"], ["float32"], [[10 ** 12]]),       # 4 TB
                (["not.a.parameter"], ["float32"], [[64]]),
                (["model.norm.weight"], ["load"], [[64]]),                 # torch.load
                (["model.norm.weight"], ["float32"], [[64], [64]])):
            answer = httpx.post(url + "/update_weights_from_distributed", json={
                "names": names, "dtypes": dtypes, "shapes": shapes, "group_name": "g"})
            assert answer.status_code == 400, answer.text
    finally:
        server.groups.pop("g")
