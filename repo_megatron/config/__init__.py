"""The configuration: one tree of dataclasses loaded from YAML plus ``a.b.c=value`` overrides.

>>> cfg = load_config("examples/configs/quickstart.yaml", ["rollout.group_size=4"])

Every error is a :class:`ConfigError` naming the file and the full key path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import yaml

from .algorithm import AlgorithmConfig
from .base import ConfigError, build, fmt, knob, reference_markdown, section, set_dotted, to_dict
from .checkpoint import CheckpointConfig
from .data import DataConfig
from .logs import LoggingConfig
from .model import ModelConfig
from .optimizer import OptimizerConfig
from .parallel import ParallelConfig
from .rollout import RolloutConfig

__all__ = ["Config", "ConfigError", "load_config", "config_from_dict", "to_dict"]


@dataclass
class Config:
    run_dir: str = knob("runs/default", "Everything a run writes goes under this directory")
    seed: int = knob(1234, "Seed of data order, sampling and initialisation", ge=0)
    train_steps: int = knob(10, "RL steps to run", ge=1)
    model: ModelConfig = section(ModelConfig, "The network")
    parallel: ParallelConfig = section(ParallelConfig, "Megatron-Core parallel layout")
    rollout: RolloutConfig = section(RolloutConfig, "Sampling and the rollout engine")
    algorithm: AlgorithmConfig = section(AlgorithmConfig, "RL algorithm and loss")
    optimizer: OptimizerConfig = section(OptimizerConfig, "Optimizer and learning rate")
    data: DataConfig = section(DataConfig, "Prompts and reward")
    checkpoint: CheckpointConfig = section(CheckpointConfig, "Checkpoints")
    logging: LoggingConfig = section(LoggingConfig, "Metrics and logs")

    def validate(self, path: str) -> None:
        if self.model.hf_path is None and self.model.gguf_file is None:
            raise ConfigError("model.hf_path=null: set model.hf_path (a Hugging Face model "
                              "directory) or model.gguf_file")
        if self.model.transformer_impl == "local" and self.parallel.sequence_parallel:
            raise ConfigError("parallel.sequence_parallel=true is not supported by "
                              "model.transformer_impl=local (use transformer_engine)")

    def architecture(self):
        """The model's :class:`~repo_megatron.models.architecture.Architecture` (overrides applied)."""
        from ..models.architecture import read_architecture
        return read_architecture(self.model.hf_path, self.model.gguf_file,
                                 self.model.architecture_overrides)


def check_layout(cfg: Config, arch) -> None:
    """Divisibility of the model by the parallel layout; errors name both keys."""
    p = cfg.parallel
    tp, pp, vpp = (p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                   p.virtual_pipeline_model_parallel_size)
    if arch.num_attention_heads % tp:
        raise ConfigError(f"parallel.tensor_model_parallel_size={tp} does not divide "
                          f"model.num_attention_heads={arch.num_attention_heads}")
    if arch.num_query_groups % tp:
        raise ConfigError(f"parallel.tensor_model_parallel_size={tp} does not divide "
                          f"model.num_query_groups={arch.num_query_groups} (KV heads); "
                          f"replicating KV heads across TP ranks is not supported")
    chunks = pp * (vpp or 1)
    if arch.num_layers % chunks:
        what = f"pipeline_model_parallel_size={pp}" + (
            f" x virtual_pipeline_model_parallel_size={vpp}" if vpp else "")
        raise ConfigError(f"parallel.{what} = {chunks} model chunks does not divide "
                          f"model.num_layers={arch.num_layers}")


def config_from_dict(data: dict, source: str = "<dict>", check_model: bool = True) -> Config:
    """Build and validate a :class:`Config`; ``check_model`` also reads the model's
    architecture and checks it against the parallel layout."""
    try:
        cfg = build(Config, data)
        if check_model:
            check_layout(cfg, cfg.architecture())
    except ConfigError as e:
        raise e.with_source(source) from None
    return cfg


def parse_overrides(overrides: Sequence[str], data: dict) -> dict:
    """Apply ``a.b.c=value`` strings (values parsed as YAML) to a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value", "command line")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        set_dotted(data, key.strip(), value)
    return data


def load_config(path: str, overrides: Sequence[str] = (), check_model: bool = True) -> Config:
    """Load ``path`` (YAML), apply overrides, validate. Relative paths in ``model`` and ``data``
    stay relative to the working directory, as on the command line."""
    if not os.path.exists(path):
        raise ConfigError("no such file", path)
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"not valid YAML{where}: {getattr(e, 'problem', e)}", path) from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"the top level must be a mapping, got {fmt(data)}", path)
    try:
        parse_overrides(overrides, data)
    except ConfigError as e:
        raise e.with_source(path) from None
    return config_from_dict(data, source=path, check_model=check_model)


def config_reference() -> str:
    return reference_markdown(Config, "Configuration reference")
