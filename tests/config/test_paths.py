"""Relative input paths in a config resolve against the config file's directory (the shipped
configs work from any directory); outputs and command-line overrides against the working
directory."""

import os
import subprocess
import sys

import yaml

from repo_megatron.config import load_config
from repo_megatron.metrics.writer import read_rows
from tests.helpers import write_tiny_llama
from tests.run.conftest import ROOT

CONFIGS = os.path.join(ROOT, "examples", "configs")


def test_inputs_resolve_against_the_config_outputs_and_overrides_against_the_cwd(tmp_path,
                                                                                  monkeypatch):
    project = tmp_path / "project"
    write_tiny_llama(str(project / "models" / "tiny"))
    (project / "configs").mkdir()
    (project / "data").mkdir()
    config = project / "configs" / "run.yaml"
    config.write_text(yaml.safe_dump({
        "run_dir": "runs/x",
        "model": {"hf_path": "../models/tiny", "load": "../ckpt", "cache_dir": "cache"},
        "data": {"path": "../data/train.jsonl", "eval_path": "/abs/eval.jsonl"},
        "checkpoint": {"directory": "ckpts"}}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(os.path.relpath(config), ["data.eval_path=local.jsonl"])
    assert cfg.model.hf_path == str(project / "models" / "tiny")
    assert cfg.model.load == str(project / "ckpt")
    assert cfg.data.path == str(project / "data" / "train.jsonl")
    assert cfg.data.eval_path == str(elsewhere / "local.jsonl")     # an override: the cwd
    assert (cfg.run_dir, cfg.checkpoint.directory, cfg.model.cache_dir) == \
        ("runs/x", "ckpts", "cache")                                 # outputs: the cwd


def test_gguf_names_and_files_inside_hf_path_are_left_alone(tmp_path, monkeypatch):
    from repo_megatron.config import resolve_input_paths

    for model, expected in (({"gguf_file": "smollm2"}, "smollm2"),
                            ({"hf_path": "/m", "gguf_file": "w.gguf"}, "w.gguf"),
                            ({"gguf_file": "w.gguf"}, str(tmp_path / "w.gguf")),
                            ({"gguf_file": "~/w.gguf"}, os.path.expanduser("~/w.gguf"))):
        data = {"model": dict(model)}
        resolve_input_paths(data, str(tmp_path))
        assert data["model"]["gguf_file"] == expected, model


def test_every_shipped_config_finds_its_inputs_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    names = sorted(n for n in os.listdir(CONFIGS) if n.endswith(".yaml"))
    assert len(names) >= 5
    for name in names:
        cfg = load_config(os.path.join(CONFIGS, name), check_model=False)
        for key, value in (("data.path", cfg.data.path), ("data.eval_path", cfg.data.eval_path),
                           ("model.hf_path", cfg.model.hf_path)):
            assert value is None or os.path.exists(value), (name, key, value)
        if cfg.model.load:  # written by the conversion job, at the repository's checkpoints/
            assert os.path.dirname(cfg.model.load) == os.path.join(ROOT, "checkpoints"), name
        assert not os.path.isabs(cfg.run_dir), name
        if cfg.model.hf_path:  # the architecture is readable from here too
            cfg.architecture()


def test_the_tiny_config_trains_from_another_directory(tmp_path):
    """The issue's failure: `DataError: examples/data/arith_train.jsonl: no such file` when
    run outside the repository root."""
    proc = subprocess.run(
        [sys.executable, "-m", "repo_megatron.cli", "train", os.path.join(CONFIGS, "tiny.yaml"),
         "train_steps=1", "logging.progress_bar=false", "logging.tensorboard=false"],
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
        env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_rows(str(tmp_path / "runs" / "tiny"))   # run_dir: relative to the cwd
    assert [r["step"] for r in rows] == [1], rows
    assert os.path.isdir(tmp_path / "runs" / "tiny" / "checkpoints" / "step_000001")
