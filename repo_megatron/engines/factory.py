"""The config -> a rollout engine: which engine ``rollout.engine`` asks for, and the model
configuration the embedded one is built from."""

from __future__ import annotations

from ..config import Config


def hf_config(cfg: Config):
    """The model's transformers config, with ``model.architecture_overrides`` applied."""
    from transformers import AutoConfig

    from ..hf_files import load_hf_config_dict

    hf = load_hf_config_dict(cfg.model.hf_path, cfg.model.gguf_file)
    hf.update(cfg.model.architecture_overrides)
    hf.pop("transformers_version", None)
    return AutoConfig.for_model(hf.pop("model_type"), **hf)


def uses_sglang(cfg: Config) -> bool:
    """Whether the run's rollouts come from SGLang servers (``rollout.engine: sglang``, or
    ``auto`` with servers named or launched) rather than the embedded engine."""
    sg = cfg.rollout.sglang
    return cfg.rollout.engine == "sglang" or (cfg.rollout.engine == "auto" and bool(
        sg.urls or sg.router_url or sg.launch.num_servers))


def build_engine(cfg: Config, tokenizer, config):
    """The rollout engine the config asks for: SGLang servers, or the embedded CPU engine
    (a transformers model of the same architecture whose weights the first sync sets)."""
    if uses_sglang(cfg):
        from .sglang.engine import SGLangEngine
        return SGLangEngine(cfg.rollout.sglang)
    import torch
    from transformers import AutoModelForCausalLM

    from .embedded import HFEngine

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return HFEngine(model, tokenizer, batch_size=cfg.rollout.batch_size)
