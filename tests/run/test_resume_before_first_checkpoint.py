"""A run killed before its first checkpoint resumes from step 0 without evaluating step 0
again: the step-0 eval row is kept, the killed step's rows are redone, one row per step."""

import signal

import yaml

from repo_megatron.metrics.writer import read_rows
from tests.run.conftest import tiny_run_config
from tests.run.test_resume import _run


def test_resume_without_a_checkpoint_keeps_the_step_0_eval(tiny_chat_model, tmp_path):
    run_dir = tmp_path / "run"
    cfg = tiny_run_config(tiny_chat_model, str(run_dir), train_steps=2,
                          checkpoint={"save_interval": 0, "hf_export_at_end": False})
    cfg_path = str(tmp_path / "run.yaml")
    with open(cfg_path, "w") as f:
        yaml.safe_dump(cfg, f)
    code, out = _run(cfg_path, failpoint="after_rollout:2")   # step 1 done, no checkpoint
    assert code == -signal.SIGKILL, out
    rows = read_rows(str(run_dir))
    assert [r["step"] for r in rows] == [0, 1] and "eval/solve_rate" in rows[0]

    code, out = _run(cfg_path, "--resume")
    assert code == 0, out
    assert "no complete checkpoint" in out
    resumed = read_rows(str(run_dir))
    assert [r["step"] for r in resumed] == [0, 1, 2]
    assert resumed[0] == rows[0]                     # the first eval was not run again
