"""The prepared GPU check (scripts/gpu_check.sh, repo_megatron.run.gpu_check) as far as a CPU
can run it: every check skipped without a GPU, the driver's verdicts and exit code, and the
trainer check itself on the CPU (GPU_CHECK_ALLOW_CPU=1, gloo, real Megatron-Core)."""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest

from repo_megatron.runtime import cpu_compat
from repo_megatron.run import gpu_check

ROOT = pathlib.Path(__file__).resolve().parents[2]
PHASES = ["build", "rollout", "prepare", "train", "weight_sync", "checkpoint_save",
          "checkpoint_load"]
no_gpu_only = pytest.mark.skipif(cpu_compat.has_gpu(), reason="a GPU is here: the checks run")


def run(command: list, **env) -> tuple[subprocess.CompletedProcess, list[str], dict]:
    """``command`` from the repository root; (process, check lines, final JSON)."""
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env})
    lines = proc.stdout.strip().splitlines()
    return proc, lines[:-1], json.loads(lines[-1])


@no_gpu_only
def test_script_skips_every_check_without_a_gpu_and_installs_nothing(tmp_path):
    venv = tmp_path / "venv"
    proc, lines, final = run(["bash", "scripts/gpu_check.sh"], PYTHON=sys.executable,
                             GPU_CHECK_VENV=str(venv), GPU_CHECK_ALLOW_CPU="0")
    assert proc.returncode == 0, proc.stderr
    assert lines == [f"check {name}: skipped (no CUDA GPU)" for name in gpu_check.CHECKS]
    assert final == {"gpu_check": "skipped", "device": None, "checks": {
        name: {"status": "skipped", "why": "no CUDA GPU"} for name in gpu_check.CHECKS}}
    assert not venv.exists()


@no_gpu_only
def test_trainer_check_runs_on_the_cpu_when_allowed():
    proc, lines, final = run([sys.executable, "-m", gpu_check.MODULE, "--only", "trainer_step"],
                             GPU_CHECK_ALLOW_CPU="1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert lines[0].startswith("check trainer_step: ran (cpu, bf16, TP1, 2 layers x hidden 64")
    assert final["gpu_check"] == "passed"
    step = final["checks"]["trainer_step"]
    assert list(step["phases"]) == PHASES
    for figures in step["phases"].values():   # no GPU: the memory figures are zero
        assert figures["start_bytes"] == figures["peak_bytes"] == 0 and figures["seconds"] >= 0
    assert math.isfinite(step["loss"]) and step["grad_norm"] > 0
    estimate = step["estimate"]
    assert estimate["source"] == "repo_megatron.plan.memory"
    state = sum(estimate[f"{p}_bytes"] for p in ("weights", "gradients", "optimizer",
                                                    "reference"))
    largest = max(estimate["step_bytes"], estimate["weight_sync_bytes"])
    assert estimate["step_bytes"] > 0 and estimate["weight_sync_bytes"] > 0
    assert abs(estimate["total_bytes"] - (state + largest)) <= 2   # int() of each part
    assert estimate["reference_bytes"] == estimate["weights_bytes"] > 0   # the KL term's model


def test_driver_fails_only_for_a_check_that_ran_and_failed(monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "gpu_or_skip", lambda allow_cpu=False: True)
    outcomes = {"trainer_step": {"status": "failed", "why": "RuntimeError: boom"},
                "te_fp8": {"status": "skipped", "why": "transformer_engine does not import"},
                "sglang_ipc": {"status": "skipped", "why": "sglang does not import"}}
    monkeypatch.setattr(gpu_check, "run_isolated", lambda name, timeout_s: outcomes[name])
    monkeypatch.setattr(cpu_compat, "gpu_description", lambda: {"name": "test GPU"})
    assert gpu_check.main([]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[:3] == ["check trainer_step: failed (RuntimeError: boom)",
                       "check te_fp8: skipped (transformer_engine does not import)",
                       "check sglang_ipc: skipped (sglang does not import)"]
    assert json.loads(out[3]) == {"gpu_check": "failed", "device": {"name": "test GPU"},
                                  "checks": outcomes}
    outcomes["trainer_step"] = {"status": "skipped", "why": "megatron.core does not import"}
    assert gpu_check.main([]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["gpu_check"] == "skipped"


def test_a_check_that_raises_is_a_failure_with_one_line(monkeypatch):
    def broken():
        raise RuntimeError("CUDA error: an illegal memory access\nsecond line")

    monkeypatch.setattr(gpu_check, "te_fp8", broken)
    assert gpu_check.run_check("te_fp8", 60) == {
        "status": "failed", "why": "RuntimeError: CUDA error: an illegal memory access"}


def test_sglang_side_rebuilds_our_payloads_with_sglangs_own_classes(tmp_path):
    """The other process of the sglang_ipc check, on CPU payloads (by value; on a GPU they are
    CUDA-IPC handles): SGLang's deserialiser and FlattenedTensorBucket give back every tensor."""
    import torch

    from repo_megatron.weight_sync.flattened_bucket import bucket_payloads

    pytest.importorskip("sglang.srt.weight_sync.tensor_bucket")
    bucket = [("a.weight", torch.randn(3, 4).to(torch.bfloat16)), ("b.bias", torch.randn(5))]
    path = tmp_path / "payloads.json"
    path.write_text(json.dumps(bucket_payloads(bucket)))
    proc = subprocess.run([sys.executable, "-m", gpu_check.MODULE, "--rebuild-sglang", str(path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rebuilt = json.loads(proc.stdout.splitlines()[-1])
    assert rebuilt == {name: gpu_check.tensor_description(t) for name, t in bucket}
    assert rebuilt["a.weight"]["dtype"] == "torch.bfloat16"


def test_fp8_recipe_follows_the_card():
    assert gpu_check.fp8_recipe_for((9, 0)) == "tensorwise"     # H100 / H200
    assert gpu_check.fp8_recipe_for((10, 0)) == "tensorwise"    # Blackwell
    assert gpu_check.fp8_recipe_for((8, 9)) == "delayed"        # Ada
    with pytest.raises(gpu_check.Skip, match="compute capability 8.9 or newer; this GPU has 8.0"):
        gpu_check.fp8_recipe_for((8, 0))


@pytest.mark.gpu
def test_trainer_check_measures_memory_on_a_gpu():
    if not cpu_compat.has_gpu():
        pytest.skip("needs a CUDA GPU")
    proc, lines, final = run([sys.executable, "-m", gpu_check.MODULE, "--only", "trainer_step"])
    assert proc.returncode == 0, lines
    phases = final["checks"]["trainer_step"]["phases"]
    assert phases["train"]["peak_bytes"] > phases["train"]["start_bytes"] > 0
