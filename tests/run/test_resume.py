"""A run killed mid-checkpoint-save and again mid-step resumes with --resume, reaches its
target step with one metrics row per step and only complete checkpoints, and ends exactly
where the same run never interrupted ends: the same metrics rows, final weights and replay
buffer."""

import os
import signal
import subprocess
import sys
import time

import torch
import yaml

from repo_megatron.checkpoint.manager import complete_checkpoints, read_meta
from repo_megatron.metrics.writer import read_rows
from tests.helpers import global_tensors
from tests.run.conftest import ROOT, tiny_run_config


def _run(cfg_path, *extra, failpoint=None, settle_s=0.0):
    """``repo-megatron train`` in a session of its own: (exit code, the end of its output).
    ``settle_s``: how long the helper processes of a killed trainer get to stop on their own
    (a rollout process stopping its servers) before the rest of the session is killed."""
    env = {**os.environ, "REPO_MEGATRON_FAILPOINT": failpoint or ""}
    # Output to a file, not a pipe: helper processes of a killed trainer may still hold it.
    with open(cfg_path + ".log", "w+") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "repo_megatron.cli", "train", cfg_path, *extra],
            env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=600)
            deadline = time.monotonic() + settle_s
            while time.monotonic() < deadline:
                os.killpg(proc.pid, 0)           # ProcessLookupError once all have exited
                time.sleep(0.2)
        except ProcessLookupError:
            pass
        finally:
            try:  # helper processes of a killed trainer must not outlive the test
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.seek(0)
        return proc.returncode, log.read()[-5000:]


def _write_config(tmp_path, model: str, name: str, data: str, **sections) -> tuple[str, str]:
    run_dir = str(tmp_path / name)
    cfg = tiny_run_config(model, run_dir, train_steps=4,
                          checkpoint={"save_interval": 1, "keep_last": 2,
                                      "hf_export_at_end": False},
                          # the same two prompts every step: the buffer replays two samples a prompt from step 2
                          algorithm={"micro_batch_size": 2, "replay": {"enabled": True}},
                          **sections)
    cfg["data"].update(path=data, shuffle=False)
    path = str(tmp_path / f"{name}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path, run_dir


def _comparable(row: dict) -> dict:
    """A metrics row without its wall-clock timings."""
    return {k: v for k, v in row.items() if not (k.startswith("time/") or k.endswith("time_s"))}


def _final_state(run_dir: str, scratch: str) -> tuple[dict, dict]:
    """Every tensor of the last checkpoint (weights and optimizer state) and its replay buffer
    (``ReplayBuffer.state()``: prompt uid -> stored samples)."""
    (step, path), = complete_checkpoints(os.path.join(run_dir, "checkpoints"))[-1:]
    assert step == 4
    trainer_state = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False)
    return global_tensors(path, scratch), trainer_state["replay"]


def test_killed_and_resumed_run_equals_an_uninterrupted_one(tiny_chat_model, tmp_path):
    data = tmp_path / "two_prompts.jsonl"
    with open(os.path.join(ROOT, "examples", "data", "arith_train.jsonl")) as f:
        data.write_text("".join(f.readlines()[:2]))
    cfg_path, run_dir = _write_config(tmp_path, tiny_chat_model, "run", str(data))
    ckpt_dir = os.path.join(run_dir, "checkpoints")

    # 1. Killed while writing the step-2 checkpoint: every shard on disk, not yet committed.
    code, out = _run(cfg_path, failpoint="checkpoint_before_commit:2")
    assert code == -signal.SIGKILL, out
    assert [s for s, _ in complete_checkpoints(ckpt_dir)] == [1]
    assert os.path.isdir(os.path.join(ckpt_dir, ".tmp-step_000002"))
    assert [r["step"] for r in read_rows(run_dir)] == [0, 1, 2]
    assert " INFO " in out, "logging.level INFO (the default) shows INFO lines"

    # 2. Resumed from step 1, killed in the middle of step 3 (after its rollout).
    code, out = _run(cfg_path, "--resume", failpoint="after_rollout:3")
    assert code == -signal.SIGKILL, out
    assert not os.path.exists(os.path.join(ckpt_dir, ".tmp-step_000002"))
    assert [s for s, _ in complete_checkpoints(ckpt_dir)] == [1, 2]

    # 3. Resumed again: reaches step 4.
    code, out = _run(cfg_path, "--resume")
    assert code == 0, out
    rows = read_rows(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    kept = complete_checkpoints(ckpt_dir)
    assert [s for s, _ in kept] == [3, 4]
    assert all(read_meta(path)["step"] == s for s, path in kept)
    assert not [n for n in os.listdir(ckpt_dir) if n.startswith(".tmp-")]

    # 4. The same run, never interrupted (and quiet: logging.level is honoured).
    straight_cfg, straight_dir = _write_config(tmp_path, tiny_chat_model, "straight",
                                               str(data),
                                               logging={"level": "WARNING"})
    code, out = _run(straight_cfg)
    assert code == 0, out
    assert " INFO " not in out, "logging.level=WARNING must hide INFO lines"
    straight_rows = read_rows(straight_dir)
    assert [_comparable(r) for r in rows] == [_comparable(r) for r in straight_rows]
    assert any(r.get("rollout/replayed_samples", 0) > 0 for r in rows[1:]), \
        "the replay buffer was never used: the comparison would not cover it"
    final, replay = _final_state(run_dir, str(tmp_path / "resumed.pt"))
    straight_final, straight_replay = _final_state(straight_dir, str(tmp_path / "straight.pt"))
    assert final.keys() == straight_final.keys()
    assert any(k.startswith("decoder.") for k in final) and any(
        k.startswith("optimizer.") for k in final)
    for name, tensor in final.items():
        assert torch.equal(tensor, straight_final[name]), f"final {name} differs"
    assert len(replay) > 0 and replay == straight_replay    # the buffers, as plain data
