"""Rank 0's rollout side in a process of its own (rollout.max_staleness > 0 with SGLang servers):
the same rollouts, state and evaluation as in the trainer's process, failures that come back as
themselves, and a child that stops its servers when the trainer's process closes it or goes
away. The servers are one `repo-megatron serve` worker the side launches itself."""

import importlib.util
import os
import sys

import httpx
import psutil
import pytest

from repo_megatron.config import config_from_dict
from repo_megatron.data.run_data import load_run_data
from repo_megatron.run.rollout_process import RolloutProcess, runs_in_own_process
from repo_megatron.run.rollout_side import EngineRollout
from tests.helpers import write_tiny_chat_model
from tests.run.conftest import tiny_run_config
from tests.sglang.servers import free_ports

pytestmark = pytest.mark.skipif(importlib.util.find_spec("starlette") is None,
                                reason="`serve` needs starlette")


def _config(tmp_path, k=1, **rollout):
    model_dir = write_tiny_chat_model(str(tmp_path / "model"), with_weights=True)
    port = free_ports(1)
    cfg = tiny_run_config(model_dir, str(tmp_path / "run"), rollout={
        "max_staleness": k, "engine": "sglang", "prompts_per_step": 2, "group_size": 3,
        "sglang": {"weight_sync": "disk", "disk_dir": str(tmp_path / "sync"),
                   "launch": {"num_servers": 1, "base_port": port,
                              "command": [sys.executable, "-m", "repo_megatron.cli", "serve"],
                              "args": ["--model", model_dir, "--threads", "1",
                                       "--weights-root", str(tmp_path)],
                              "startup_timeout_s": 240}}, **rollout})
    cfg["data"]["shuffle"] = False
    return config_from_dict(cfg)


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def _tokens(groups):
    return [(g.prompt.uid, [(tuple(s.response_ids), s.reward) for s in g.samples])
            for g in groups]


def test_async_rollout_process_is_chosen_for_rollouts_ahead_of_sglang_servers(tmp_path):
    model_dir = write_tiny_chat_model(str(tmp_path / "model"))

    def cfg(**rollout):
        return config_from_dict(tiny_run_config(model_dir, str(tmp_path / "run"),
                                                rollout=rollout))

    urls = {"sglang": {"urls": ["http://127.0.0.1:1"]}}
    assert runs_in_own_process(cfg(max_staleness=1, engine="sglang", **urls))
    assert runs_in_own_process(cfg(max_staleness=2, engine="auto", **urls))
    assert not runs_in_own_process(cfg(max_staleness=0, engine="sglang", **urls))  # synchronous
    assert not runs_in_own_process(cfg(max_staleness=1, engine="embedded"))  # the trainer's model
    assert not runs_in_own_process(cfg(max_staleness=1, engine="auto"))


def test_async_rollout_process_gives_the_rollouts_of_one_process_and_stops_its_servers(
        tmp_path):
    cfg = _config(tmp_path)
    data = load_run_data(cfg)
    here = EngineRollout(cfg, data)
    try:
        expected = [here.rollout(1), here.rollout(2)]
        expected_state, expected_eval = here.state(), here.evaluate()
    finally:
        here.close()
    assert not _answers(here.engine.cfg.urls[0])

    side = RolloutProcess(cfg, data)
    try:
        url = side.engine.cfg.urls[0]
        assert side.process.pid != os.getpid() and side.process.is_alive() and _answers(url)
        got = [side.rollout(1), side.rollout(2)]
        for (groups, metrics), (want_groups, want_metrics) in zip(got, expected):
            assert _tokens(groups) == _tokens(want_groups)
            assert {k for k in metrics} == {k for k in want_metrics}
            assert metrics["rollout/reward_onpolicy_mean"] == want_metrics["rollout/reward_onpolicy_mean"]
        assert all(s.weight_version == 0 for groups, _ in got for g in groups for s in g.samples)
        assert side.state() == expected_state
        assert side.evaluate() == expected_eval
        # the version this process's weight sync sets is the one the child's samples carry
        side.engine.set_weight_version(3)
        groups, _ = side.rollout(3)
        assert {s.weight_version for g in groups for s in g.samples} == {3}
    finally:
        side.close()
    assert side.process.exitcode == 0 and not _answers(url)
    side.close()                                                  # idempotent


def test_async_rollout_process_restores_state_and_stops_when_the_trainer_goes_away(tmp_path):
    cfg = _config(tmp_path)
    side = RolloutProcess(cfg, load_run_data(cfg))
    try:
        first = side.rollout(1)
        state = side.state()
        second = side.rollout(2)
        side.load_state(state)              # as a resumed run: step 2's rollout again
        assert _tokens(side.rollout(2)[0]) == _tokens(second[0])
        assert _tokens(first[0]) != _tokens(second[0])
        with pytest.raises(KeyError, match="sampler") as e:
            side.load_state({})             # the child's own exception, not a pipe error
        assert any("in the rollout process" in note for note in e.value.__notes__)
        url = side.engine.cfg.urls[0]
        # the trainer's process killed: its end of the pipe closes without a word
        side.conn.close()
        side.process.join(120)
        assert side.process.exitcode == 0 and not _answers(url)
        with pytest.raises(RuntimeError, match="after close"):
            side.rollout(3)
    finally:
        side.close()


def test_async_rollout_process_that_dies_is_named(tmp_path):
    cfg = _config(tmp_path)
    side = RolloutProcess(cfg, load_run_data(cfg))
    try:
        side.process.kill()
        side.process.join()
        with pytest.raises(RuntimeError, match=r"rollout process \(pid \d+\) died during "
                                               r"rollout \(exit code -9\)"):
            side.rollout(1)
    finally:
        side.close()
        # a SIGKILLed child cannot stop the servers it launched (their own sessions)
        for process in psutil.process_iter(["cmdline"]):
            if str(tmp_path) in " ".join(process.info["cmdline"] or []):
                process.kill()
