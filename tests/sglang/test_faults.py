"""Fault policy of the client against scripted workers: 503 is retried with backoff, 400 fails
at once with a clear error, a hung worker hits the timeout, a dead worker's requests move on."""

import time

import pytest

from repo_megatron.config.rollout import SGLangConfig
from repo_megatron.engines.base import SamplingParams
from repo_megatron.engines.sglang import SGLangEngine, SGLangError, SGLangTimeout

from .servers import FakeWorker, free_ports, serve_in_thread

PARAMS = SamplingParams(max_new_tokens=2, seed=1)


def engine_for(urls, **overrides) -> SGLangEngine:
    settings = {"retry_backoff_s": 0.05, "request_timeout_s": 30.0, **overrides}
    cfg = SGLangConfig(urls=urls, **settings)
    return SGLangEngine(cfg)


def test_503_is_retried_until_the_worker_answers():
    fake = FakeWorker(lambda call: 503 if call <= 2 else "ok")
    with serve_in_thread(fake.app(), free_ports(1)) as url, engine_for([url]) as engine:
        [result] = engine.generate([[1, 2]], [PARAMS])
    assert fake.calls == 3 and result.token_ids == [7, 2] and result.logprobs == [-0.5, -0.25]


def test_503_beyond_max_retries_names_server_endpoint_and_status():
    fake = FakeWorker(lambda call: 503)
    with serve_in_thread(fake.app(), free_ports(1)) as url, \
            engine_for([url], max_retries=2) as engine:
        with pytest.raises(SGLangError, match=rf"SGLang {url}/generate: HTTP 503: scripted 503"):
            engine.generate([[1, 2]], [PARAMS])
    assert fake.calls == 3


def test_400_fails_at_once_without_retry():
    fake = FakeWorker(lambda call: 400)
    with serve_in_thread(fake.app(), free_ports(1)) as url, engine_for([url]) as engine:
        with pytest.raises(SGLangError, match=r"HTTP 400: scripted 400") as error:
            engine.generate([[1, 2]], [PARAMS])
    assert fake.calls == 1 and error.value.status == 400


def test_hung_worker_hits_the_timeout_instead_of_hanging():
    fake = FakeWorker(lambda call: "hang")
    with serve_in_thread(fake.app(), free_ports(1)) as url, \
            engine_for([url], request_timeout_s=1.0) as engine:
        start = time.monotonic()
        with pytest.raises(SGLangTimeout, match=r"/generate: no answer within 1 s"):
            engine.generate([[1, 2]], [PARAMS])
        assert time.monotonic() - start < 5


def test_requests_of_a_dead_worker_go_to_the_next_one():
    fake = FakeWorker(lambda call: "ok")
    dead = f"http://127.0.0.1:{free_ports(1)}"           # nothing listens there
    with serve_in_thread(fake.app(), free_ports(1)) as url:
        engine = SGLangEngine(SGLangConfig(urls=[url], retry_backoff_s=0.05))
        engine.cfg.urls = [dead, url]                     # the dead one fails after start
        with engine:
            results = engine.generate([[1]] * 4, [PARAMS] * 4)
    assert len(results) == 4 and fake.calls == 4
