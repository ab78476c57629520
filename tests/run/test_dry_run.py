"""``repo-megatron train CONFIG --dry-run`` on the shipped 70B configs, run as a user runs it:
the TP2 x PP2 form of the Llama 70B config in CI, every shipped config's full layout (32 and
64 ranks) in the slow tests."""

import os
import re
import subprocess
import sys

import pytest

from tests.run.conftest import ROOT

SHIPPED = {"llama3_70b_repo.yaml": 32, "qwen25_72b_repo.yaml": 64,
           "llama3_70b_repo_colocated.yaml": 64}


def _dry_run(config: str, *overrides: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "repo_megatron.cli", "train",
         os.path.join("examples", "configs", config), *overrides, "--dry-run"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _check_passed(proc: subprocess.CompletedProcess, world: int) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = proc.stdout
    ranks = [line for line in out.splitlines() if re.match(r"\s+rank\s+\d+ \(tp", line)]
    assert len(ranks) == world, out
    losses = {line.split("loss ")[1].split(",")[0] for line in ranks}
    assert len(losses) == 1, "every rank must report the same full-batch loss"
    assert re.search(r"dry run passed in \d+ s, device-faithful: one step, weight sync of \d+ "
                     r"tensors", out), out
    return out


def test_70b_config_dry_runs_in_its_tp2_pp2_form():
    proc = _dry_run("llama3_70b_repo.yaml", "parallel.tensor_model_parallel_size=2",
                    "parallel.pipeline_model_parallel_size=2", "model.fp8=e4m3", timeout=1200)
    out = _check_passed(proc, world=4)
    assert ("TP 2 x PP 2 (virtual 2) x DP 1 = 4 gloo processes; scaled model: 8 layers, "
            "hidden 128, 16 heads / 2 KV heads, tied embeddings False, bf16, distributed "
            "optimizer") in out
    # what a CPU cannot run is substituted, each in one line of the log
    for substitution in (
            # the config's relative path, resolved against the config file's directory
            f"model.load={os.path.join(ROOT, 'checkpoints', 'llama3_70b_torch_dist')} -> "
            "random weights",
            "model.transformer_impl=transformer_engine -> local (Transformer Engine needs a GPU)",
            "parallel.sequence_parallel=true -> false",
            "model.fp8=e4m3 -> null",
            "parallel.distributed_backend=nccl -> gloo",
            "rollout.engine=sglang -> synthetic groups",
            "dry run: device-faithful: every rank tracks which tensors a GPU run holds"):
        assert len([ln for ln in proc.stderr.splitlines() if substitution in ln]) == 1, \
            (substitution, proc.stderr[-3000:])


@pytest.mark.slow
@pytest.mark.parametrize("config", list(SHIPPED))
def test_shipped_config_dry_runs_in_its_full_layout(config):
    _check_passed(_dry_run(config, timeout=3600), world=SHIPPED[config])
