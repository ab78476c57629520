"""``model.fp8_param_gather`` reaches megatron-core's DDP config, which its distributed
optimizer reads to write the updated main params into FP8 weights."""

import json

import pytest

from repo_megatron.config import config_from_dict
from repo_megatron.config.base import ConfigError
from tests.distributed import run_distributed
from tests.helpers import write_tiny_llama


def _ddp_configs(model_dir: str) -> dict:
    """fp8_param_gather asked or not -> (TransformerConfig.fp8_param, what the trainer's DDP
    chunks and its distributed optimizer(s) were given)."""
    from unittest import mock

    from repo_megatron.algorithm import LossParams
    from repo_megatron.config.model import ModelConfig
    from repo_megatron.config.optimizer import OptimizerConfig
    from repo_megatron.config.parallel import ParallelConfig
    from repo_megatron.models import builder
    from repo_megatron.models.architecture import parse_hf_config
    from repo_megatron.runtime.distributed import initialize
    from repo_megatron.trainer.train_step import PolicyTrainer

    parallel = ParallelConfig()
    initialize(parallel, seed=1)
    arch = parse_hf_config(json.load(open(f"{model_dir}/config.json")))
    out = {}
    for asked in (False, True):
        model_cfg = ModelConfig(fp8="e4m3", fp8_recipe="tensorwise", params_dtype="bf16",
                                fp8_param_gather=asked)
        # What a GPU node with Transformer Engine would choose is the only thing faked: the
        # TransformerConfig is the real one of this model config (without TE, megatron-core's
        # FP8 contexts are null, so the local spec builds bf16 weights).
        with mock.patch.object(builder, "select_transformer_impl", lambda cfg: "local"):
            chunks = builder.build_model(arch, model_cfg, parallel)
        trainer = PolicyTrainer(chunks, OptimizerConfig(use_distributed_optimizer=True),
                                LossParams(), total_steps=1)
        optimizers = getattr(trainer.optimizer, "chained_optimizers", [trainer.optimizer])
        out[asked] = (chunks[0].config.fp8_param,
                      [m.ddp_config.fp8_param_gather for m in trainer.model],
                      [o.ddp_config.fp8_param_gather for o in optimizers])
    return out


def test_fp8_param_gather_reaches_the_ddp_config_of_the_distributed_optimizer(tmp_path):
    model_dir = write_tiny_llama(str(tmp_path / "tiny"), num_layers=2)
    (res,) = run_distributed(_ddp_configs, 1, model_dir)
    assert res[True] == (True, [True], [True])
    assert res[False] == (False, [False], [False])


def test_fp8_param_gather_without_the_distributed_optimizer_is_a_config_error(tmp_path):
    model_dir = write_tiny_llama(str(tmp_path / "tiny"))
    model = {"hf_path": model_dir, "fp8": "e4m3", "params_dtype": "bf16",
             "fp8_param_gather": True}
    with pytest.raises(ConfigError, match="model.fp8_param_gather=true needs "
                                          "optimizer.use_distributed_optimizer=true"):
        config_from_dict({"model": model}, "x.yaml")
    # With it, or without FP8 (the key is then ignored, like the other fp8 keys), it passes.
    config_from_dict({"model": model, "optimizer": {"use_distributed_optimizer": True}}, "x.yaml")
    config_from_dict({"model": {**model, "fp8": None}}, "x.yaml")
