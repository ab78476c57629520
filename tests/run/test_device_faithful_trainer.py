"""The trainer's phases, device-faithful (repo_megatron.runtime.device_faithful), on real
Megatron-Core: rollout groups over the control plane -> old log-probs -> loss through the
pipeline schedule -> optimizer step -> weight sync -> checkpoint save and load, for GRPO,
RePO (with a KL reference model), LUFFY and TIS, at TP2 and at PP2. A host tensor where a GPU
run holds a device tensor (or a tensor in the wrong collective) fails the step here as it would
fail on the cluster: at step 1, the train/rollout mismatch and TIS did (docs/training.md).

The four algorithms of a layout run one after the other in the same two ranks (a launch costs
seconds of imports); each test reads its own algorithm's result (a failure fails them all, with
the rank's traceback)."""

import dataclasses
import os

import pytest

from repo_megatron.config import load_config
from repo_megatron.run.dry_run import RANK_IMPORTS, dry_config, run_step, verdict
from tests.distributed import free_port, run_distributed
from tests.run.conftest import ROOT

ALGORITHMS = {
    "grpo": {"injection": "none"},
    "repo": {"injection": "repo", "kl_coef": 0.01},
    "luffy": {"injection": "luffy"},
    "tis": {"injection": "repo", "tis_cap": 2.0},
}
LAYOUTS = {"tp2": {"tensor_model_parallel_size": 2},
           "pp2": {"pipeline_model_parallel_size": 2}}


def _configs(layout: dict, run_root: str) -> dict:
    base = load_config(os.path.join(ROOT, "examples", "configs", "tiny.yaml"), [])
    base = dataclasses.replace(base, parallel=dataclasses.replace(base.parallel, **layout))
    out = {}
    for name, algorithm in ALGORITHMS.items():
        scaled, _ = dry_config(base, os.path.join(run_root, name))
        out[name] = dataclasses.replace(
            scaled, algorithm=dataclasses.replace(scaled.algorithm, **algorithm))
    return out


def _run_all(configs: dict, ports: list[int]) -> dict:
    """Every algorithm's step in these ranks, each in a process group of its own (a fresh
    rendezvous port: the last one's store may still answer); a failure ends the launch."""
    results = {}
    for (name, cfg), port in zip(configs.items(), ports):
        os.environ["MASTER_PORT"] = str(port)
        results[name] = run_step(cfg, "WARNING")
    return results


@pytest.fixture(scope="module", params=list(LAYOUTS))
def layout_results(request, tmp_path_factory):
    configs = _configs(LAYOUTS[request.param], str(tmp_path_factory.mktemp(request.param)))
    ports = [free_port() for _ in configs]
    per_rank = run_distributed(_run_all, 2, configs, ports, timeout=600, preload=RANK_IMPORTS)
    return configs, per_rank


@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_trainer_step_is_device_faithful(layout_results, algorithm):
    configs, per_rank = layout_results
    results = [rank[algorithm] for rank in per_rank]
    assert all(r["device_faithful"] for r in results)
    assert verdict(results, configs[algorithm]) == []
