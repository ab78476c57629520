"""The configuration: one tree of dataclasses loaded from YAML plus ``a.b.c=value`` overrides.

>>> cfg = load_config("examples/configs/quickstart.yaml", ["rollout.group_size=4"])

Every error is a :class:`ConfigError` naming the file and the full key path.

Paths: a relative *input* path in the file (``model.hf_path``, ``model.gguf_file``,
``model.load``, ``data.path``, ``data.eval_path``: knobs declared ``path="input"``) resolves
against the directory of the config file, so a config and its data travel together and the
run works from any directory. Input paths given as command-line overrides, and every output
path (``run_dir``, ``checkpoint.directory``, ``model.cache_dir``...), resolve against the
working directory, as on any command line.
"""

from __future__ import annotations

import codecs
import dataclasses
import os
import typing
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import yaml

from ..errors import ConfigError
from .algorithm import AlgorithmConfig
from .base import build, fmt, knob, reference_markdown, section, set_dotted, to_dict
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
    run_dir: str = knob("runs/default", "Everything a run writes goes under this directory",
                        path="output")
    seed: int = knob(1234, "Seed of data order, sampling and initialisation", ge=0,
                     le=2 ** 32 - 1)
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
        if self.model.fp8 is not None and self.model.fp8_param_gather and \
                not self.optimizer.use_distributed_optimizer:
            # Megatron-LM asserts the same (arguments.py): only the distributed optimizer
            # writes the updated main params into FP8 weights.
            raise ConfigError("model.fp8_param_gather=true needs "
                              "optimizer.use_distributed_optimizer=true (Megatron-Core keeps "
                              "FP8 weights only with its distributed optimizer)")

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


MAX_DEPTH = 32  # deeper YAML cannot be a config; checking it first keeps errors one line


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
        except RecursionError:
            raise ConfigError(f"override {key.strip()}: nested too deeply", "command line") from None
        set_dotted(data, key.strip(), value)
    return data


def too_deep(value: Any, limit: int = MAX_DEPTH) -> Optional[str]:
    """The key path (mapping keys only) under which ``value`` nests deeper than ``limit``
    levels, or None. Each object is visited once (YAML aliases share objects: a "billion
    laughs" stays cheap)."""
    stack, seen = [(value, "", 0)], set()
    while stack:
        node, path, depth = stack.pop()
        if not isinstance(node, (dict, list)) or id(node) in seen:
            continue
        if depth >= limit:
            return path or "<root>"
        seen.add(id(node))
        if isinstance(node, dict):
            stack.extend((v, f"{path}.{k}" if path else str(k), depth + 1)
                         for k, v in node.items())
        else:
            stack.extend((v, path, depth + 1) for v in node)
    return None


def read_yaml(path: str) -> dict:
    """The mapping in YAML file ``path``; every problem is a one-line :class:`ConfigError`."""
    if not os.path.exists(path):
        raise ConfigError("no such file", path)
    if os.path.isdir(path):
        raise ConfigError("is a directory, not a YAML file", path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(f"cannot be read ({e.strerror})", path) from None
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise ConfigError("is UTF-16 text: save it as UTF-8", path)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})",
                          path) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"not valid YAML{where}: {fmt(str(getattr(e, 'problem', None) or e))}",
                          path) from None
    except RecursionError:
        raise ConfigError(f"nested too deeply (a config has at most {MAX_DEPTH} levels)",
                          path) from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"the top level must be a mapping, got {fmt(data)}", path)
    return data


def _overridden(key: str, overridden: set) -> bool:
    return any(key == k or key.startswith(k + ".") for k in overridden)


def resolve_input_paths(data: dict, base_dir: str, overridden: set = frozenset(),
                        cls: type = None, prefix: str = "") -> None:
    """In place: make the relative input paths of raw config ``data`` absolute, against
    ``base_dir`` (the config file's directory), or against the working directory for keys
    set on the command line (``overridden``: dotted keys). Values of the wrong type are left
    for :func:`build` to report."""
    cls = cls or Config
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key, value = prefix + f.name, data.get(f.name)
        if f.metadata.get("section"):
            if isinstance(value, dict):
                resolve_input_paths(value, base_dir, overridden, hints[f.name], key + ".")
            continue
        item = typing.get_args(hints[f.name])
        if typing.get_origin(hints[f.name]) is list and item and dataclasses.is_dataclass(item[0]):
            for i, entry in enumerate(value if isinstance(value, list) else []):  # data.sources
                if isinstance(entry, dict):
                    resolve_input_paths(entry, base_dir, overridden, item[0], f"{key}[{i}].")
            continue
        kind = f.metadata.get("path")
        if kind not in ("input", "gguf") or not isinstance(value, str) or not value:
            continue
        if kind == "gguf" and (data.get("hf_path") or not ("/" in value or value.endswith(".gguf"))):
            continue  # relative to hf_path, or a packaged model's name (smollm2)
        base = os.getcwd() if _overridden(key, overridden) else base_dir
        data[f.name] = os.path.normpath(os.path.join(base, os.path.expanduser(value)))


def load_config(path: str, overrides: Sequence[str] = (), check_model: bool = True) -> Config:
    """Load ``path`` (YAML), apply overrides, resolve input paths (see the module docstring),
    validate."""
    data = read_yaml(path)
    try:
        parse_overrides(overrides, data)
    except ConfigError as e:
        raise e.with_source(path) from None
    deep = too_deep(data)
    if deep is not None:
        raise ConfigError(f"{deep}: nested deeper than {MAX_DEPTH} levels", path)
    resolve_input_paths(data, os.path.dirname(os.path.abspath(path)),
                        {item.split("=", 1)[0].strip() for item in overrides})
    return config_from_dict(data, source=path, check_model=check_model)


def config_reference() -> str:
    return reference_markdown(Config, "Configuration reference")
