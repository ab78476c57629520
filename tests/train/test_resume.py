"""A run killed mid-checkpoint-save and again mid-step resumes with --resume and reaches its
target step with one metrics row per step and only complete checkpoints."""

import os
import signal
import subprocess
import sys

import yaml

from repo_megatron.checkpoint.manager import complete_checkpoints, read_meta
from repo_megatron.metrics.writer import read_rows
from tests.train.conftest import tiny_run_config


def _run(cfg_path, *extra, failpoint=None):
    env = {**os.environ, "REPO_MEGATRON_FAILPOINT": failpoint or ""}
    # Output to a file, not a pipe: helper processes of a killed trainer may still hold it.
    with open(cfg_path + ".log", "w+") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "repo_megatron.cli", "train", cfg_path, *extra],
            env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=600)
        finally:
            try:  # helper processes of a killed trainer must not outlive the test
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.seek(0)
        return proc.returncode, log.read()[-5000:]


def test_sigkill_mid_save_and_mid_step_then_resume(tiny_chat_model, tmp_path):
    run_dir = tmp_path / "run"
    cfg = tiny_run_config(tiny_chat_model, str(run_dir), train_steps=4,
                          checkpoint={"save_interval": 1, "keep_last": 2,
                                      "hf_export_at_end": False})
    cfg_path = str(tmp_path / "run.yaml")
    with open(cfg_path, "w") as f:
        yaml.safe_dump(cfg, f)
    ckpt_dir = str(run_dir / "checkpoints")

    # 1. Killed while writing the step-2 checkpoint: every shard on disk, not yet committed.
    code, out = _run(cfg_path, failpoint="checkpoint_before_commit:2")
    assert code == -signal.SIGKILL, out
    assert [s for s, _ in complete_checkpoints(ckpt_dir)] == [1]
    assert os.path.isdir(os.path.join(ckpt_dir, ".tmp-step_000002"))
    assert [r["step"] for r in read_rows(str(run_dir))] == [0, 1, 2]

    # 2. Resumed from step 1, killed in the middle of step 3 (after its rollout).
    code, out = _run(cfg_path, "--resume", failpoint="after_rollout:3")
    assert code == -signal.SIGKILL, out
    assert not os.path.exists(os.path.join(ckpt_dir, ".tmp-step_000002"))
    assert [s for s, _ in complete_checkpoints(ckpt_dir)] == [1, 2]

    # 3. Resumed again: reaches step 4.
    code, out = _run(cfg_path, "--resume")
    assert code == 0, out
    steps = [r["step"] for r in read_rows(str(run_dir))]
    assert steps == [0, 1, 2, 3, 4], steps
    kept = complete_checkpoints(ckpt_dir)
    assert [s for s, _ in kept] == [3, 4]
    assert all(read_meta(path)["step"] == s for s, path in kept)
    assert not [n for n in os.listdir(ckpt_dir) if n.startswith(".tmp-")]
