"""Adding a policy loss is one file and one registry line (docs/architecture.md): a loss
written to a temporary module, registered there through ``repo_megatron.algorithm.registry``
and named by ``algorithm.policy_loss``, is the loss of a one-step run: the dry run's step at
TP2 (old log-probs, the loss through Megatron's pipeline schedule, the optimizer step, the
weight sync, a checkpoint saved and loaded), device-faithful. The built-in loss in the same
ranks is the control: the new loss's metric comes from the new loss alone."""

import dataclasses
import importlib
import os
import sys
import textwrap

import pytest

from repo_megatron.algorithm.registry import POLICY_LOSSES
from repo_megatron.config import load_config
from repo_megatron.run.dry_run import RANK_IMPORTS, dry_config, run_step, verdict
from tests.distributed import free_port, run_distributed
from tests.run.conftest import ROOT

LOSS_FILE = '''
"""Unclipped importance-weighted policy gradient: -A * pi_theta / pi_old on every token."""

import torch

from repo_megatron.algorithm.registry import register_policy_loss


@register_policy_loss("unclipped_ratio")
def unclipped_ratio_loss(logprobs, old_logprobs, advantages, mask, params):
    zeros = torch.zeros_like(logprobs)
    ratio = torch.exp(torch.where(mask, logprobs - old_logprobs, zeros))
    return (torch.where(mask, -advantages * ratio, zeros),
            {"unclipped_ratio_tokens": mask.to(logprobs.dtype)})
'''


def _register(module_dir: str) -> None:
    """The registry line: import the loss's file."""
    if module_dir not in sys.path:
        sys.path.insert(0, module_dir)
    importlib.import_module("unclipped_ratio_loss")


def _both_losses(module_dir: str, configs: dict, ports: list[int]) -> dict:
    _register(module_dir)
    results = {}
    for (name, cfg), port in zip(configs.items(), ports):
        os.environ["MASTER_PORT"] = str(port)  # a fresh rendezvous for each run
        results[name] = run_step(cfg, "WARNING")
    return results


@pytest.fixture
def scratch_loss_registry(monkeypatch):
    """Registers the test loss here without leaving it behind."""
    monkeypatch.setattr(POLICY_LOSSES, "_entries", dict(POLICY_LOSSES._entries))
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield
    sys.modules.pop("unclipped_ratio_loss", None)


def test_a_registered_loss_is_the_loss_of_a_one_step_run(tmp_path, scratch_loss_registry):
    (tmp_path / "unclipped_ratio_loss.py").write_text(textwrap.dedent(LOSS_FILE))
    _register(str(tmp_path))  # the config checks the name against the registry
    base = load_config(os.path.join(ROOT, "examples", "configs", "tiny.yaml"),
                       ["parallel.tensor_model_parallel_size=2"])
    configs = {}
    for loss in ("unclipped_ratio", "ppo_clip"):
        scaled, _ = dry_config(base, str(tmp_path / loss))
        configs[loss] = dataclasses.replace(
            scaled, algorithm=dataclasses.replace(scaled.algorithm, policy_loss=loss))
    per_rank = run_distributed(_both_losses, 2, str(tmp_path), configs,
                               [free_port() for _ in configs], timeout=600, preload=RANK_IMPORTS)
    for name, cfg in configs.items():
        results = [rank[name] for rank in per_rank]
        assert verdict(results, cfg) == [], name
    for rank in per_rank:
        # every response token of a RePO step is on-policy (the rephrase too): the new loss
        # ran on all of them; the built-in one knows nothing of its metric
        tokens = rank["unclipped_ratio"]["metrics"]["train/unclipped_ratio_tokens"]
        assert tokens == pytest.approx(1.0, abs=1e-6)  # a float32 token mean
        assert "train/unclipped_ratio_tokens" not in rank["ppo_clip"]["metrics"]
        assert "train/clipfrac_low" in rank["ppo_clip"]["metrics"]
