"""kill -9 of a trainer in the middle of a checkpoint write leaves no process behind, and the
run resumes from the previous checkpoint; sync and async (megatron's async dist-checkpointing).

Each job runs under ``tests.checkpoint.reaper``, a child subreaper: every process the trainer
started is re-parented to it when the trainer dies, so none can escape the count.
"""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import write_tiny_llama
from tests.run.conftest import tiny_chat_model  # noqa: F401 (fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(root, *args, failpoint=""):
    env = {**os.environ, "REPO_MEGATRON_FAILPOINT": failpoint}
    proc = subprocess.run([sys.executable, "-m", "tests.checkpoint.reaper", sys.executable, "-m",
                           "tests.checkpoint.save_job", str(root), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture
def root(tmp_path):
    write_tiny_llama(str(tmp_path / "model"), num_layers=2)
    return tmp_path


def test_megatron_alone_leaves_its_writer_results_server_behind(root):
    """The control: a plain megatron save, then kill -9. Its Manager process (the writers'
    results queue) and the resource tracker outlive the trainer: the reaper sees them."""
    out = _run(root, "--raw")
    assert out["returncode"] == -9
    assert any("multiprocessing" in cmd for cmd in out["survivors"]), out


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_kill_9_during_a_checkpoint_write_leaves_no_process_and_the_run_resumes(root, mode):
    extra = ["--async"] if mode == "async" else []
    # Killed right after forking step 2's first writer process (the async writer with --async).
    out = _run(root, "--steps", "3", *extra, failpoint="checkpoint_writer_forked:2")
    assert out["returncode"] == -9, out
    assert out["survivors"] == [], out
    checkpoints = root / "run" / "checkpoints"
    assert sorted(os.listdir(checkpoints)) == [".tmp-step_000002", "step_000001"]

    out = _run(root, "--steps", "2", "--resume", *extra)
    assert out["returncode"] == 0 and out["survivors"] == [], out
    result = json.loads(out["last_line"])
    assert result["restored"] == 1 and result["saved"] == [2, 3]
    assert result["complete"] == ["step_000002", "step_000003"]
    assert all(result["verified"].values()) and result["partial"] == [], result


def test_a_training_run_killed_mid_save_leaves_no_process(tiny_chat_model, tmp_path):
    """The whole trainer as users run it (reward workers, the embedded engine, megatron's
    writers), killed while its first checkpoint is being written: nothing outlives it."""
    import yaml

    from tests.run.conftest import tiny_run_config

    cfg = tiny_run_config(tiny_chat_model, str(tmp_path / "run"),
                          checkpoint={"save_interval": 1, "async_save": True})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "REPO_MEGATRON_FAILPOINT": "checkpoint_writer_forked:1"}
    proc = subprocess.run([sys.executable, "-m", "tests.checkpoint.reaper", sys.executable, "-m",
                           "repo_megatron.cli", "train", str(path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["returncode"] == -9, (out, proc.stderr[-2000:])
    assert out["survivors"] == [], out
    assert os.listdir(tmp_path / "run" / "checkpoints") == [".tmp-step_000001"]
