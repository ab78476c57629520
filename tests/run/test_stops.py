"""Runs that must stop do, loudly: NaN losses in a row and a reward that always fails end the
run with one line and a non-zero exit; the last good checkpoint is kept."""

import math
import subprocess
import sys

import yaml

from repo_megatron.checkpoint.manager import complete_checkpoints
from repo_megatron.metrics.writer import read_rows
from tests.distributed import run_distributed
from tests.run.conftest import ROOT, tiny_run_config


def test_a_reward_that_always_fails_stops_the_run_with_one_line(tiny_chat_model, tmp_path):
    cfg = tiny_run_config(tiny_chat_model, str(tmp_path / "run"), train_steps=6,
                          data={"reward": "tests.rewards.misbehaving:always_nan",
                                "max_failed_reward_steps": 2},
                          checkpoint={"save_interval": 1})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "repo_megatron.cli", "train", str(path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "TrainingStopped: step 2: every reward call failed in 2 steps in a row "
        "(data.max_failed_reward_steps=2); e.g. reward returned nan: not a finite number")
    assert "Traceback" not in proc.stderr
    # loud from the first step: the failure and its reason are in the log
    assert ("reward tests.rewards.misbehaving:always_nan failed for 2 of 2 samples: reward "
            "returned nan: not a finite number") in proc.stderr  # the step-0 evaluation
    rows = read_rows(str(tmp_path / "run"))
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all(r["rollout/reward_failures"] == r["rollout/reward_calls"] > 0 for r in rows[1:])


def _train_with_nan_losses_from_step_2(cfg: dict):
    from repo_megatron.config import config_from_dict
    from repo_megatron.run import session as session_module
    from repo_megatron.run.guard import TrainingStopped
    from repo_megatron.run.loop import train

    prepare = session_module.Session.prepare
    calls = []

    def nan_after_first(self, groups):  # a real NaN loss from step 2 on
        prepared = prepare(self, groups)
        calls.append(1)
        if len(calls) >= 2:
            for minibatch in prepared.minibatches:
                for mb in minibatch:
                    mb.advantages = torch_full_nan(mb.advantages)
        return prepared

    session_module.Session.prepare = nan_after_first
    try:
        train(config_from_dict(cfg))
    except TrainingStopped as e:
        return str(e)
    return "not stopped"


def torch_full_nan(t):
    import torch
    return torch.full_like(t, math.nan)


def test_nan_losses_in_a_row_stop_the_run_and_keep_the_last_good_checkpoint(tiny_chat_model,
                                                                              tmp_path):
    run = tmp_path / "run"
    cfg = tiny_run_config(tiny_chat_model, str(run), train_steps=8,
                          checkpoint={"save_interval": 1, "keep_last": 2})
    (stopped,) = run_distributed(_train_with_nan_losses_from_step_2, 1, cfg, timeout=900)
    assert stopped == ("step 4: 3 optimizer steps in a row had a non-finite loss or gradient "
                       "(optimizer.max_nonfinite_steps=3); they were skipped and not "
                       "checkpointed, the last good checkpoint is kept"), stopped
    rows = read_rows(str(run))
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[1]["train/nonfinite_skipped"] == 0 and math.isfinite(rows[1]["train/loss"])
    for row in rows[2:]:
        assert row["train/nonfinite_skipped"] == 1 and math.isnan(row["train/loss"]), row
    assert [r["train/nonfinite_in_a_row"] for r in rows[2:]] == [1, 2, 3]
    # keep_last=2 would have pushed step 1 out, had NaN steps been checkpointed
    assert [s for s, _ in complete_checkpoints(str(run / "checkpoints"))] == [1]
