"""Seeded fuzz campaign over ``repo-megatron serve`` requests: hundreds of ``/generate`` bodies
with bent fields, broken bytes and content types, management requests with hostile or
malformed payloads (issue 13's remote-code pickle among them), wrong methods and paths, sent
four at a time so they share batches. Each case must end OK (2xx with a well-formed answer) or
CLEAN_ERROR (4xx with SGLang's error shape); a 5xx, a traceback in the answer or the server's
log, a case over its time bound, or a server whose answers or weights changed fails the run."""

import asyncio
import base64
import json
import logging
import math
import pickle
import random
import time

import httpx
import pytest
import torch

from repo_megatron.engines.sglang_server.app import ServeOptions

from ..serve.bodies import SERVER_MAX_NEW_TOKENS, VOCAB, nested, random_body
from ..serve.test_tensor_payload import gadgets
from ..sglang.inprocess import serve_model
from .tally import CLEAN_ERROR, DATA_LOST, HANG, OK, SERVER_ERROR, TRACEBACK, Tally

from ..serve.conftest import model_dir  # noqa: F401,E402  (the tiny model fixture)

SEED, CASES, CASE_TIMEOUT_S = 20260513, 480, 60.0
CANARY = {"input_ids": [1, 2, 3], "sampling_params": {"temperature": 0, "max_new_tokens": 4}}
JSON = {"content-type": "application/json"}


class ErrorLog(logging.Handler):
    """Server-side ERROR records (Starlette logs an unhandled exception's traceback there)."""
    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def odd(rng):
    return rng.choice([None, True, -1, 0, 2 ** 64, 1.5, math.nan, "", "x" * 30, [], {},
                       [1, "a"], {"k": [None]}, nested(400)])


def management_case(rng, marker: str) -> tuple[str, object]:
    """(path, body) of a hostile or malformed management request."""
    path = rng.choice(["/update_weights_from_tensor", "/update_weights_from_disk",
                       "/init_weights_update_group", "/update_weights_from_distributed",
                       "/destroy_weights_update_group", "/abort_request", "/flush_cache",
                       "/begin_weight_update", "/end_weight_update"])
    entries = [*gadgets(marker).values(), "not base64", base64.b64encode(b"\x80\x04junk").decode(),
               base64.b64encode(pickle.dumps([("model.norm.weight", torch.zeros(3))])).decode(),
               base64.b64encode(pickle.dumps({"flattened_tensor": torch.zeros(4),
                                              "metadata": [1, 2]})).decode()]
    body = {
        "/update_weights_from_tensor": lambda: {
            "serialized_named_tensors": rng.choice([[rng.choice(entries)], odd(rng)]),
            "load_format": rng.choice([None, "flattened_bucket", odd(rng)])},
        "/update_weights_from_disk": lambda: {"model_path": rng.choice(
            ["/etc", "/", "../../..", "/proc/self", "", odd(rng)])},
        "/init_weights_update_group": lambda: {     # never an allowed host: no connection
            "master_address": rng.choice(["203.0.113.5", "evil.example", odd(rng)]),
            "master_port": rng.choice([29500, 0, 70000, odd(rng)]),
            "rank_offset": rng.choice([1, -1, odd(rng)]), "world_size": rng.choice([2, odd(rng)]),
            "backend": rng.choice(["gloo", "nccl", "mpi", odd(rng)])},
        "/update_weights_from_distributed": lambda: {
            "names": rng.choice([["model.norm.weight"], odd(rng)]),
            "dtypes": rng.choice([["float32"], ["load"], odd(rng)]),
            "shapes": rng.choice([[[64]], [[10 ** 12]], odd(rng)]),
            "group_name": rng.choice(["weight_update_group", odd(rng)])},
    }.get(path, lambda: {rng.choice(["rid", "abort_all", "group_name", "x"]): odd(rng)})()
    return path, body


def make_case(rng, index: int, marker: str) -> tuple[str, str, str, bytes, dict]:
    """(name, method, path, body bytes, headers) of case ``index``."""
    kind = rng.random()
    if kind < 0.62:
        body = random_body(rng)
        return f"{index}:generate", "POST", "/generate", json.dumps(body).encode(), JSON
    if kind < 0.72:
        raw = rng.choice([b"", b"{", b"\xff\xfe\x00", b"[" * 3000, b'{"input_ids": [1,]}',
                          json.dumps(random_body(rng)).encode()[:rng.randint(1, 40)],
                          bytes(rng.randrange(256) for _ in range(64))])
        headers = rng.choice([JSON, {"content-type": "text/plain"}, {},
                              {"content-type": "application/x-www-form-urlencoded"}])
        return f"{index}:raw", "POST", "/generate", raw, headers
    if kind < 0.92:
        path, body = management_case(rng, marker)
        return f"{index}:{path}", "POST", path, json.dumps(body).encode(), JSON
    method, path = rng.choice([("GET", "/generate"), ("DELETE", "/generate"),
                               ("POST", "/nope"), ("GET", "/server_info"),
                               ("GET", "/health_generate"), ("POST", "/get_model_info"),
                               ("PUT", "/update_weights_from_disk")])
    return f"{index}:{method} {path}", method, path, b"{}", JSON


def classify(method: str, path: str, body: bytes, response: httpx.Response) -> tuple[str, str]:
    """(outcome, detail) of one answer."""
    text = response.text
    if "Traceback" in text:
        return TRACEBACK, text[:300]
    if response.status_code >= 500:
        return SERVER_ERROR, f"{response.status_code} {text[:300]}"
    if response.status_code >= 400:
        if response.status_code in (404, 405) or path == "/flush_cache":
            return CLEAN_ERROR, ""    # Starlette's plain Not Found / Method Not Allowed; SGLang's
            #                           plain-text flush answer
        try:
            answer = response.json()
        except ValueError:
            return TRACEBACK, f"4xx without SGLang's error shape: {text[:300]}"
        error = answer.get("error") if isinstance(answer, dict) else None
        if isinstance(error, dict) and error.get("message") or \
                isinstance(answer, dict) and answer.get("success") is False or \
                error in ("Unauthorized", "Forbidden"):
            return CLEAN_ERROR, ""
        return TRACEBACK, f"4xx without SGLang's error shape: {text[:300]}"
    if path == "/generate" and method in ("POST", "PUT"):
        answers = response.json()
        for answer in answers if isinstance(answers, list) else [answers]:
            ids, meta = answer["output_ids"], answer["meta_info"]
            if not all(isinstance(t, int) and 0 <= t < VOCAB for t in ids) or \
                    len(ids) > SERVER_MAX_NEW_TOKENS or meta["completion_tokens"] != len(ids) \
                    or any(not math.isfinite(lp[0]) for lp in meta["output_token_logprobs"]):
                return DATA_LOST, f"malformed generation {json.dumps(answer)[:300]}"
    return OK, ""


def weights_digest(server) -> float:
    return float(sum(p.double().sum() for p in server.worker.engine.model.parameters()))


@pytest.mark.timeout(1800)
def test_serve_fuzz_campaign(model_dir, tmp_path):  # noqa: F811
    rng = random.Random(SEED)
    tally = Tally("serve")
    marker = str(tmp_path / "pwned")
    errors = ErrorLog()
    loggers = [logging.getLogger(), logging.getLogger("uvicorn")]   # uvicorn's do not propagate
    for logger in loggers:
        logger.addHandler(errors)
    options = ServeOptions(max_new_tokens=SERVER_MAX_NEW_TOKENS, weights_root=str(tmp_path),
                           max_body_bytes=1 << 20)
    cases = [make_case(rng, i, marker) for i in range(CASES)]
    start = time.monotonic()
    try:
        with serve_model(model_dir, options=options) as (url, server):
            canary = httpx.post(url + "/generate", json=CANARY, timeout=60).json()["output_ids"]
            digest = weights_digest(server)

            async def send(client, case):
                name, method, path, body, headers = case
                errors_before = len(errors.records)
                try:
                    response = await asyncio.wait_for(client.request(
                        method, url + path, content=body, headers=headers), CASE_TIMEOUT_S)
                except asyncio.TimeoutError:
                    return name, HANG, f"no answer within {CASE_TIMEOUT_S:g} s"
                except httpx.HTTPError as e:
                    return name, SERVER_ERROR, f"{type(e).__name__}: {e}"
                outcome, detail = classify(method, path, body, response)
                if outcome in (OK, CLEAN_ERROR) and len(errors.records) > errors_before:
                    return name, TRACEBACK, errors.records[-1].getMessage()[:300]
                return name, outcome, detail

            async def campaign():
                async with httpx.AsyncClient(timeout=None) as client:
                    for group in range(0, len(cases), 4):   # four at a time: shared batches
                        for name, outcome, detail in await asyncio.gather(
                                *(send(client, c) for c in cases[group:group + 4])):
                            tally.record(name, outcome, detail)
                        if group % 80 == 76 or group + 4 >= len(cases):
                            now = (await client.post(url + "/generate", json=CANARY,
                                                     timeout=60)).json()["output_ids"]
                            if now != canary or weights_digest(server) != digest:
                                tally.record(f"canary after {group + 4}", DATA_LOST,
                                             f"answers or weights changed: {now} vs {canary}")
            asyncio.run(campaign())
    finally:
        for logger in loggers:
            logger.removeHandler(errors)
    elapsed = time.monotonic() - start
    print(f"fuzz serve: {tally.tried} cases in {elapsed:.1f} s")
    assert not (tmp_path / "pwned").exists()
    tally.check(min_cases=CASES)
