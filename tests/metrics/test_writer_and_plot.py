"""Metric rows: one per step, torn lines skipped, truncation on resume, plots drawn."""

import json
import os

from repo_megatron.metrics.plot import plot_run
from repo_megatron.metrics.writer import MetricsWriter, read_rows, truncate_after


def test_rows_tensorboard_and_truncation(tmp_path):
    w = MetricsWriter(str(tmp_path), tensorboard=True)
    for step in (1, 2, 3):
        w.write(step, {"rollout/reward_onpolicy_mean": step / 10, "train/grad_norm": float("nan"),
                       "note": "text"})
    w.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "rollout/rew')  # a run killed mid-write
    rows = read_rows(str(tmp_path))
    assert [r["step"] for r in rows] == [1, 2, 3]
    truncate_after(str(tmp_path), 2)
    assert [r["step"] for r in read_rows(str(tmp_path))] == [1, 2]
    assert os.listdir(tmp_path / "tensorboard")


def test_disabled_writer_writes_nothing(tmp_path):
    w = MetricsWriter(str(tmp_path / "r"), enabled=False)
    w.write(1, {"a": 1})
    assert not os.path.exists(tmp_path / "r")


def test_plot_draws_a_png(tmp_path):
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step in range(1, 4):
            f.write(json.dumps({"step": step, "rollout/reward_onpolicy_mean": 0.1 * step,
                                "train/entropy": 1.0 / step}) + "\n")
    out = plot_run(str(tmp_path))
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(out) > 5000
