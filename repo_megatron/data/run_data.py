"""What a run reads before its model is built: the tokenizer and every prompt, checked.

Rank 0 loads it first thing (:class:`repo_megatron.run.session.Session`), so that a bad
dataset stops every rank in seconds, before minutes of model building.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import Config


@dataclass
class RunData:
    """What rank 0 reads before the model is built: the tokenizer and the checked prompts."""
    tokenizer: object
    formatter: object
    sources: list        # [(Source, [Prompt])]: data.sources, or the one file of data.path
    eval_prompts: list


def load_run_data(cfg: Config) -> RunData:
    """The tokenizer and every prompt of ``data.sources`` (or ``data.path``) and
    ``data.eval_path``, validated (DataError names the file or source, row and column)."""
    from . import ChatFormatter, load_prompts, load_sources, load_tokenizer

    tokenizer = load_tokenizer(cfg.model.hf_path, cfg.model.gguf_file)
    formatter = ChatFormatter.from_config(tokenizer, cfg.data)
    sources = load_sources(cfg.data, formatter)
    eval_prompts = (load_prompts(cfg.data, formatter, cfg.data.eval_path)
                    [:cfg.data.eval_max_prompts] if cfg.data.eval_path else [])
    return RunData(tokenizer, formatter, sources, eval_prompts)
