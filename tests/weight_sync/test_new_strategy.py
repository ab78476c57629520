"""A new weight sync strategy is one file and one registry line: the trainer's stages stream
through it with no change anywhere else.

The strategy below (every bucket its own safetensors directory, loaded by the workers as soon as
it is written) is written to a temporary module and registered with one line, as
``weight_sync/registry.py`` names the built-in ones. A one-step run at PP2 (each stage's sender
pushes its own buckets) against an in-process ``repo-megatron serve`` worker then uses it: the
directories of both stages and both syncs hold every weight of the model, the worker serves
exactly the last sync's tensors, and the rollouts' log-probs are Megatron's own."""

import os
import sys
import textwrap

import torch
from safetensors.torch import load_file

from repo_megatron.config import config_from_dict
from repo_megatron.metrics.writer import read_rows
from tests.distributed import run_distributed
from tests.helpers import write_tiny_chat_model
from tests.run.conftest import tiny_run_config

STRATEGY_FILE = '''
"""``bucket_dirs``: each sender writes every bucket as its own safetensors directory and the
workers load it at once (``/update_weights_from_disk``); the directories stay."""

import os

from safetensors.torch import save_file

from repo_megatron.engines.sglang.protocol import disk_update_body
from repo_megatron.weight_sync.base import WeightSyncStrategy
from repo_megatron.weight_sync.disk import own_storage


class BucketDirs(WeightSyncStrategy):
    name = "bucket_dirs"
    in_session = False                  # SGLang takes disk updates outside a session
    uses_disk_dir = True                # it writes files the workers read, in disk_dir

    def __init__(self, cfg, stage=0):
        super().__init__(cfg, stage)
        self.pushed = 0

    async def prepare(self, target):
        self.pushed = 0

    async def push(self, target, bucket):
        self.pushed += 1
        directory = os.path.join(target.plan.disk_dir, f"v{target.plan.version}-pp{self.stage}-"
                                                       f"{self.pushed:03d}")
        os.makedirs(directory)
        save_file(own_storage(bucket), os.path.join(directory, "model.safetensors"))
        await target.post_all("/update_weights_from_disk", disk_update_body(directory))
'''


def _register(module_dir: str) -> None:
    """The registry line (a built-in's is ``"bucket_dirs": "bucket_dirs:BucketDirs"`` in
    ``weight_sync/registry.py``)."""
    from repo_megatron.weight_sync.registry import STRATEGIES

    sys.path.insert(0, module_dir)
    STRATEGIES.register("bucket_dirs")(__import__("bucket_dirs").BucketDirs)


def _train(module_dir: str, cfg_dict: dict) -> int:
    from repo_megatron.run.loop import train

    _register(module_dir)
    return train(config_from_dict(cfg_dict))


def test_a_strategy_in_one_file_and_one_registry_line_syncs_a_pp2_run(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from repo_megatron.engines.sglang_server.app import ServeOptions
    from tests.sglang.inprocess import serve_model

    (tmp_path / "bucket_dirs.py").write_text(textwrap.dedent(STRATEGY_FILE))
    model = write_tiny_chat_model(str(tmp_path / "model"), with_weights=True)
    buckets = tmp_path / "buckets"
    with serve_model(model, options=ServeOptions(weights_root=str(tmp_path))) as (url, server):
        cfg = tiny_run_config(model, str(tmp_path / "run"), train_steps=1,
                              parallel={"pipeline_model_parallel_size": 2},
                              rollout={"engine": "sglang", "sglang": {
                                  "urls": [url], "weight_sync": "bucket_dirs",
                                  "weight_bucket_mb": 1, "disk_dir": str(buckets)}})
        assert run_distributed(_train, 2, str(tmp_path), cfg, timeout=600) == [0, 0]
        served = dict(server.worker.engine.model.named_parameters())
        served_version = server.weight_version

    hf_names = set(dict(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model))
                        .named_parameters()))
    synced = {}                          # version -> {name: tensor}
    stages = {}                          # version -> stages that wrote
    for directory in sorted(os.listdir(buckets)):
        version, stage, _ = directory.split("-")
        tensors = load_file(os.path.join(buckets, directory, "model.safetensors"))
        assert not synced.setdefault(version, {}).keys() & tensors.keys(), directory
        synced[version].update(tensors)
        stages.setdefault(version, set()).add(stage)
    assert sorted(synced) == ["v0", "v1"]            # the first sync and the step's
    for version in synced:
        assert stages[version] == {"pp0", "pp1"}     # each stage pushed its own buckets
        assert set(synced[version]) == hf_names
    assert served_version == "1"
    for name, tensor in synced["v1"].items():      # the worker holds the last sync's weights
        assert torch.equal(served[name].detach(), tensor), name
    rows = read_rows(str(tmp_path / "run"))
    assert [r["step"] for r in rows] == [0, 1]
    # sampled with exactly the weights Megatron trains
    assert rows[1]["train/logprob_mismatch_mean"] < 1e-4, rows[1]
