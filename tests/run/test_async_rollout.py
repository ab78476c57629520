"""Asynchronous rollouts (rollout.max_staleness = k): the producer's schedule, then the whole
loop: k = 0 is the synchronous run, no trained sample is more than k versions stale, and a run
killed while a rollout ahead is in flight resumes to the weights of the run never killed; k = 1
through two `repo-megatron serve` workers behind sglang-router."""

import importlib.util
import os
import signal
import sys
import threading

import httpx
import pytest
import torch
import yaml

from repo_megatron.checkpoint.manager import complete_checkpoints
from repo_megatron.config import config_from_dict
from repo_megatron.metrics.writer import read_rows
from repo_megatron.rollout.types import Group, Prompt
from repo_megatron.run.async_rollout import AsyncRollout
from repo_megatron.run.rollout_side import RolloutSide
from repo_megatron.testbed.runs import serve_rollout
from tests.distributed import run_distributed
from tests.helpers import global_tensors, write_tiny_chat_model
from tests.run.conftest import tiny_run_config
from tests.run.test_resume import _comparable, _run
from tests.sglang.servers import free_ports


# ---- the producer's schedule, on a fake rollout side ------------------------------------------

class FakeSide(RolloutSide):
    """Rollouts that record which thread ran them; ``fail_at`` raises there."""

    def __init__(self, fail_at=None):
        self.calls, self.fail_at, self.done = [], fail_at, 0

    def rollout(self, step):
        self.calls.append((step, threading.current_thread().name))
        if step == self.fail_at:
            raise ValueError(f"rollout {step} broke")
        self.done = step
        prompt = Prompt(uid=f"u{step}", question="q", answer="a", prompt_ids=(1, 2))
        return [Group(prompt, [])], {"rollout/step": float(step)}

    def evaluate(self):
        return {}

    def state(self):
        return {"done": self.done}

    def load_state(self, state):
        self.done = state["done"]

    def export(self, weights, out):
        pass


def test_async_rollout_at_k0_runs_each_rollout_when_its_step_asks():
    side = AsyncRollout(FakeSide(), max_staleness=0, last_step=3)
    for step in (1, 2, 3):
        assert side.rollout(step)[1] == {"rollout/step": float(step)}
        side.ahead(step)
    assert side.inner.calls == [(s, threading.current_thread().name) for s in (1, 2, 3)]
    assert side.producer is None


def test_async_rollout_runs_k_steps_ahead_in_order_and_stops_at_the_last_step():
    side = AsyncRollout(FakeSide(), max_staleness=2, last_step=4)
    side.rollout(1)
    side.ahead(1)                                  # steps 2 and 3, behind the trainer's back
    side.wait()
    assert [s for s, _ in side.inner.calls] == [1, 2, 3]
    assert {name for _, name in side.inner.calls[1:]} == {"rollout-ahead"}
    assert side.rollout(2)[1] == {"rollout/step": 2.0}      # taken, not run again
    side.ahead(2)
    side.ahead(3)
    side.wait()
    assert [s for s, _ in side.inner.calls] == [1, 2, 3, 4]  # none past the run's last step
    assert [side.rollout(s)[1]["rollout/step"] for s in (3, 4)] == [3.0, 4.0]
    side.close()


def test_a_failed_rollout_ahead_fails_the_steps_that_take_it_and_those_after():
    side = AsyncRollout(FakeSide(fail_at=2), max_staleness=2, last_step=5)
    side.rollout(1)
    side.ahead(1)
    with pytest.raises(ValueError, match="rollout 2 broke"):
        side.wait()
    with pytest.raises(ValueError, match="rollout 2 broke"):
        side.rollout(3)                            # would start from rollout 2's half-done state
    assert [s for s, _ in side.inner.calls] == [1, 2]
    side.close()


def test_a_checkpoint_holds_the_rollouts_ahead_and_a_resumed_run_trains_them_first():
    side = AsyncRollout(FakeSide(), max_staleness=1, last_step=4)
    side.rollout(1)
    side.ahead(1)
    state = side.state()                           # waits for step 2's rollout
    assert state["done"] == 2 and [e["step"] for e in state["rollouts_ahead"]] == [2]
    resumed = AsyncRollout(FakeSide(), max_staleness=1, last_step=4)
    resumed.load_state(state)
    groups, metrics = resumed.rollout(2)
    assert resumed.inner.calls == [] and metrics == {"rollout/step": 2.0}
    assert groups[0].prompt.uid == "u2"
    resumed.ahead(2)
    resumed.wait()
    assert [s for s, _ in resumed.inner.calls] == [3]
    resumed.close()


# ---- the whole loop ----------------------------------------------------------------------------

def _config(model, run_dir, k, data=None, **algorithm):
    """4 steps of the tiny run with an entropy bonus, so every step moves the weights (a random
    policy's rewards are all 0), and a checkpoint after every step."""
    cfg = tiny_run_config(model, run_dir, train_steps=4, rollout={"max_staleness": k},
                          algorithm={"micro_batch_size": 2, "entropy_coef": 0.01, **algorithm},
                          optimizer={"lr": 1e-3},
                          checkpoint={"save_interval": 1, "keep_last": 4,
                                      "hf_export_at_end": False})
    if data is not None:
        cfg["data"].update(path=data, shuffle=False)
    return cfg


def _weights(run_dir, scratch):
    """The last checkpoint's model weights (global tensors)."""
    (step, path), = complete_checkpoints(os.path.join(run_dir, "checkpoints"))[-1:]
    assert step == 4
    return {k: v for k, v in global_tensors(path, scratch).items() if k.startswith("decoder.")
            or k.startswith("embedding.") or k.startswith("output_layer.")}


def _k0_and_synchronous(async_cfg, sync_cfg):
    """Train ``async_cfg`` as it is, then ``sync_cfg`` with rank 0's rollout side unwrapped
    (the synchronous loop, no AsyncRollout)."""
    from repo_megatron.run import session
    from repo_megatron.run.loop import train

    train(config_from_dict(async_cfg))
    session.AsyncRollout = lambda inner, max_staleness, last_step: inner
    return train(config_from_dict(sync_cfg))


def test_async_k0_reproduces_the_synchronous_run_metrics_and_weights(tiny_chat_model, tmp_path):
    k0 = _config(tiny_chat_model, str(tmp_path / "k0"), 0)
    # the synchronous loop, without the staleness correction (stale_tis_cap: identity at k=0)
    sync = _config(tiny_chat_model, str(tmp_path / "sync"), 0, stale_tis_cap=None)
    assert run_distributed(_k0_and_synchronous, 1, k0, sync, timeout=600) == [0]
    rows, sync_rows = read_rows(k0["run_dir"]), read_rows(sync["run_dir"])
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert [_comparable(r) for r in rows] == [_comparable(r) for r in sync_rows]
    assert all(r["train/grad_norm"] > 0 for r in rows[1:])       # the weights did move
    assert not any(k.startswith("rollout/staleness") for r in rows for k in r)
    weights = _weights(k0["run_dir"], str(tmp_path / "k0.pt"))
    sync_weights = _weights(sync["run_dir"], str(tmp_path / "sync.pt"))
    assert weights.keys() == sync_weights.keys() and weights
    for name, tensor in weights.items():
        assert torch.equal(tensor, sync_weights[name]), name


def _train(cfg):
    from repo_megatron.run.loop import train
    return train(config_from_dict(cfg))


def test_no_trained_sample_is_more_than_max_staleness_versions_old(tiny_chat_model, tmp_path):
    cfg = _config(tiny_chat_model, str(tmp_path / "k2"), 2)
    assert run_distributed(_train, 1, cfg, timeout=600) == [0]
    rows = read_rows(cfg["run_dir"])[1:]
    # step s trains at version s-1 on rollouts of version max(0, s-3): stale by min(s-1, 2)
    assert [r["rollout/staleness_max"] for r in rows] == [0.0, 1.0, 2.0, 2.0]
    assert [r["rollout/staleness_mean"] for r in rows] == [0.0, 1.0, 2.0, 2.0]
    for row in rows:
        assert sum(row[f"rollout/staleness_{k}"] for k in range(3)) == pytest.approx(1.0)
    # stale samples were sampled by other weights: pi_old / pi_behaviour moves away from 1
    assert abs(rows[-1]["train/onpolicy/behaviour_ratio"] - 1) > 1e-4
    assert rows[-1]["train/logprob_mismatch_mean"] > 1e-4
    assert rows[0]["train/logprob_mismatch_mean"] < 1e-4                 # step 1: fresh


@pytest.mark.parametrize("engine", ["embedded", "serve"])
def test_async_run_killed_during_an_in_flight_rollout_resumes_to_the_same_weights(
        tiny_chat_model, tmp_path, engine):
    """``serve``: the rollouts come from a `repo-megatron serve` worker the run launches, through
    the rollout process; only the trainer's process is killed (as the OOM killer does), and
    the rollout process stops the server when its pipe closes, so the resumed run launches
    its own on the same port."""
    data = tmp_path / "prompts.jsonl"
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
            os.path.abspath(__file__)))), "examples", "data", "arith_train.jsonl")) as f:
        data.write_text("".join(f.readlines()[:4]))
    model = (write_tiny_chat_model(str(tmp_path / "model"), with_weights=True)
             if engine == "serve" else tiny_chat_model)

    def write(name):
        cfg = _config(model, str(tmp_path / name), 1, data=str(data), replay={"enabled": True})
        if engine == "serve":
            # one sequence at a time: log-probs that do not depend on which requests arrived
            # together (continuous batching's batches follow the machine's timing)
            cfg["rollout"].update(serve_rollout(model, cfg["run_dir"], free_ports(1),
                                                batch_size=1))
        path = str(tmp_path / f"{name}.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(cfg, f)
        return path, cfg["run_dir"]

    cfg_path, run_dir = write("killed")
    # Killed in the producer thread: step 3's rollout has run (the prompt sampler, the replay
    # buffer moved on) while step 2 trains, and no step has taken it yet.
    code, out = _run(cfg_path, failpoint="rollout_ahead:3", settle_s=60)
    assert code == -signal.SIGKILL, out
    if engine == "serve":                 # the server went with the rollout process
        assert not _answers(_server_url(cfg_path)), out
    assert [r["step"] for r in read_rows(run_dir)] == [0, 1]
    kept = complete_checkpoints(os.path.join(run_dir, "checkpoints"))
    assert [s for s, _ in kept] == [1]
    state = torch.load(os.path.join(kept[0][1], "trainer_state.pt"), weights_only=True)
    assert [e["step"] for e in state["rollouts_ahead"]] == [2]     # step 2's, sampled meanwhile

    code, out = _run(cfg_path, "--resume")
    assert code == 0, out
    straight_path, straight_dir = write("straight")
    code, out = _run(straight_path)
    assert code == 0, out

    rows, straight_rows = read_rows(run_dir), read_rows(straight_dir)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert [_comparable(r) for r in rows] == [_comparable(r) for r in straight_rows]
    assert [r["rollout/staleness_max"] for r in rows[1:]] == [0.0, 1.0, 1.0, 1.0]
    assert any(r.get("rollout/replayed_samples", 0) > 0 for r in rows[1:])
    weights = _weights(run_dir, str(tmp_path / "killed.pt"))
    straight = _weights(straight_dir, str(tmp_path / "straight.pt"))
    assert weights.keys() == straight.keys() and weights
    for name, tensor in weights.items():
        assert torch.equal(tensor, straight[name]), name


def _server_url(cfg_path):
    with open(cfg_path) as f:
        launch = yaml.safe_load(f)["rollout"]["sglang"]["launch"]
    return f"http://127.0.0.1:{launch['base_port']}"


def _answers(url):
    try:
        return httpx.get(f"{url}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def test_async_rollouts_through_two_serve_workers_behind_sglang_router(tmp_path):
    """k = 1 with the SGLang engine: two `repo-megatron serve` workers behind sglang-router,
    launched by the run, disk weight sync. Every sample carries the version the workers
    served; the first step's are the synced weights exactly, the later ones one step old."""
    for module in ("starlette", "sglang_router"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"needs {module}")
    model_dir = write_tiny_chat_model(str(tmp_path / "model"), with_weights=True)
    base = free_ports(3)
    cfg = _config(model_dir, str(tmp_path / "run"), 1)
    cfg["train_steps"] = 3
    cfg["rollout"].update(engine="sglang", sglang={
        "weight_sync": "disk", "disk_dir": str(tmp_path / "sync"),
        "launch": {"num_servers": 2, "base_port": base, "router": True,
                   "router_port": base + 2,
                   "command": [sys.executable, "-m", "repo_megatron.cli", "serve"],
                   "args": ["--model", model_dir, "--threads", "1",
                            "--weights-root", str(tmp_path)],
                   "router_command": [sys.executable, "-m", "sglang_router.launch_router"],
                   "router_args": ["--policy", "round_robin", "--log-level", "warn",
                                   "--health-failure-threshold", "10",
                                   "--health-check-timeout-secs", "30"],
                   "startup_timeout_s": 240}})
    assert run_distributed(_train, 1, cfg, timeout=600) == [0]
    rows = read_rows(cfg["run_dir"])[1:]
    assert [r["rollout/staleness_max"] for r in rows] == [0.0, 1.0, 1.0]
    assert rows[0]["train/logprob_mismatch_mean"] < 1e-4       # served = trained weights
    assert all(r["train/logprob_mismatch_mean"] > 1e-4 for r in rows[1:])  # one step old
