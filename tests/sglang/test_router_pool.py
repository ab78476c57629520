"""The whole rollout path on CPU: SGLangEngine -> real sglang-router -> two
``repo-megatron serve`` workers, started by the launcher. A RePO step matches the embedded
engine under the same seed; disk, tensor and distributed (gloo) updates reach both workers;
a worker killed mid-rollout costs retries, not the step. Runs in file order: the kill is last."""

import os
import signal
import threading
import time

import httpx
import pytest

from repo_megatron.config.algorithm import AlgorithmConfig, RePOConfig
from repo_megatron.config.data import DataConfig
from repo_megatron.config.rollout import RolloutConfig, SGLangConfig
from repo_megatron.data import ChatFormatter, load_prompts
from repo_megatron.engines.base import SamplingParams
from repo_megatron.engines.sglang import SGLangEngine
from repo_megatron.rollout import RolloutStage
from tests.rollout.fakes import InProcessScorer

from .inprocess import load_tiny_engine, perturbed

TRAIN = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "data",
                     "arith_train.jsonl")
PARAMS = [SamplingParams(temperature=1.0, max_new_tokens=6, seed=s) for s in range(4)]
PROMPTS = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]


def engine_through(pool, **overrides) -> SGLangEngine:
    settings = {"request_timeout_s": 300.0, "retry_backoff_s": 0.5, "max_retries": 6,
                **overrides}
    return SGLangEngine(SGLangConfig(router_url=pool.router_url, **settings))


def repo_step(engine, formatter):
    stage = RolloutStage(engine, formatter, InProcessScorer("math"),
                         RolloutConfig(group_size=3, max_new_tokens=6),
                         AlgorithmConfig(injection="repo",
                                         repo=RePOConfig(require_verified=False)), seed=1234)
    return stage.run(load_prompts(DataConfig(path=TRAIN), formatter)[:2], step=0)


def served_versions(pool):
    return {httpx.get(url + "/get_weight_version").json()["weight_version"] for url in pool.urls}


def test_router_lists_both_workers(pool):
    with engine_through(pool) as engine:
        assert sorted(engine.run(engine.workers())) == sorted(pool.urls)
        assert all(v == (0, 5, 23) for v in engine.versions.values())


def test_repo_step_through_the_router_matches_the_embedded_engine(pool, model_dir):
    embedded = load_tiny_engine(model_dir, batch_size=8)
    formatter = ChatFormatter(embedded.tokenizer)
    with engine_through(pool) as engine:
        served = repo_step(engine, formatter)
    local = repo_step(embedded, formatter)
    assert len(served.groups) == 2
    for remote_group, local_group in zip(served.groups, local.groups):
        assert remote_group.injected_index == local_group.injected_index
        for remote, mine in zip(remote_group.samples, local_group.samples):
            assert remote.response_ids == mine.response_ids
            if mine.behaviour_logprobs is not None:
                assert remote.behaviour_logprobs == pytest.approx(mine.behaviour_logprobs,
                                                                  abs=1e-4)
    assert served.metrics["rollout/injection_rate"] == local.metrics["rollout/injection_rate"]


@pytest.mark.parametrize("strategy", ["disk", "tensor", "distributed"])
def test_weight_update_changes_generations_on_every_worker(pool, model_dir, tmp_path, strategy):
    overrides = {"weight_sync": strategy, "disk_dir": str(tmp_path / "weights"),
                 "distributed_backend": "gloo", "distributed_master_address": "127.0.0.1"}
    with engine_through(pool, **overrides) as engine:
        start = engine.weight_version
        before = engine.generate(PROMPTS, PARAMS)
        engine.update_weights(perturbed(model_dir, seed=5))
        after = engine.generate(PROMPTS, PARAMS)      # round robin: both workers answer
        assert engine.weight_version == start + 1
        assert served_versions(pool) == {str(start + 1)}
        assert all(r.weight_version == start + 1 for r in after)
        assert [r.token_ids for r in after] != [r.token_ids for r in before]
        engine.update_weights(load_tiny_engine(model_dir).model.named_parameters())
        assert [r.token_ids for r in engine.generate(PROMPTS, PARAMS)] == \
            [r.token_ids for r in before]


def test_a_closed_engine_destroys_its_update_group_on_every_worker(pool, model_dir):
    """Workers refuse a second group under the same name: a new engine's distributed update
    succeeds only if the last one destroyed its group (at close)."""
    settings = {"weight_sync": "distributed", "distributed_backend": "gloo",
                "distributed_master_address": "127.0.0.1"}
    for seed in (1, 2):
        with engine_through(pool, **settings) as engine:
            engine.update_weights(perturbed(model_dir, seed=seed))
            engine.update_weights(perturbed(model_dir, seed=seed + 10))   # group made once


def test_a_worker_killed_mid_rollout_costs_retries_not_the_step(pool):
    victim = pool.processes[1]
    prompts, params = PROMPTS * 6, [SamplingParams(max_new_tokens=24, seed=s) for s in range(24)]
    with engine_through(pool) as engine:
        outcome = {}
        rollout = threading.Thread(target=lambda: outcome.update(
            results=engine.generate(prompts, params)))
        rollout.start()
        time.sleep(1.0)
        os.killpg(victim.pid, signal.SIGKILL)
        rollout.join(timeout=120)
        assert not rollout.is_alive()
    assert len(outcome["results"]) == 24
    assert all(len(r.token_ids) > 0 for r in outcome["results"])
