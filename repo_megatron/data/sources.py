"""Prompt sources resolved from the config: where each one is, which columns it uses, its
weight and its reward. ``data.path`` is the one-source shorthand of ``data.sources``.

Errors about a source name it the way the user wrote it: a shorthand source by its file (as
before mixtures existed), a mixture source as ``source 'NAME' (FILE)`` with the config key to
change (``data.sources[1].fields.answer``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from ..config.data import DataConfig, SourceConfig, check_source_names


@dataclass(frozen=True)
class Source:
    """One source of prompts. ``columns`` maps question/answer/solution to a column (solution
    may be None: no off-policy knowledge); ``keys`` maps each field to the config key that sets
    its column (for error hints); ``label`` names the source in errors."""
    name: str
    label: str
    weight: float
    reward: str
    columns: dict
    keys: dict
    path: Optional[str] = None
    dataset: Optional[str] = None
    subset: Optional[str] = None
    split: str = "train"
    location_key: str = "data.path"     # the config key of path / dataset

    @property
    def where(self) -> str:
        """The file, or ``dataset[:subset]@split``."""
        if self.path is not None:
            return self.path
        return f"{self.dataset}{':' + self.subset if self.subset else ''}@{self.split}"


def shorthand_source(cfg: DataConfig, path: str) -> Source:
    """The file ``path`` read with the data-level columns (``data.path``, ``data.eval_path``)."""
    return Source(name=os.path.splitext(os.path.basename(path))[0], label=path, weight=1.0,
                  reward=cfg.reward, path=path,
                  columns={"question": cfg.question_key, "answer": cfg.answer_key,
                           "solution": cfg.solution_key},
                  keys={f: f"data.{f}_key" for f in ("question", "answer", "solution")})


def mixture_source(cfg: DataConfig, index: int, source: SourceConfig, name: str) -> Source:
    """``data.sources[index]``: its own columns where ``fields`` sets them, else data.*_key."""
    prefix = f"data.sources[{index}]"
    columns = {"question": cfg.question_key, "answer": cfg.answer_key,
               "solution": cfg.solution_key, **source.fields}
    return Source(name=name, label=f"source {name!r} ({source.path or source.dataset})",
                  weight=source.weight, reward=source.reward or cfg.reward, columns=columns,
                  keys={f: f"{prefix}.fields.{f}" for f in columns}, path=source.path,
                  dataset=source.dataset, subset=source.subset, split=source.split,
                  location_key=f"{prefix}.{'path' if source.path else 'dataset'}")


def resolve_sources(cfg: DataConfig) -> list[Source]:
    """The run's sources: ``data.sources``, or the one file of ``data.path``."""
    if cfg.sources:
        names = check_source_names(cfg.sources)
        return [mixture_source(cfg, i, s, n) for i, (s, n) in enumerate(zip(cfg.sources, names))]
    if cfg.path is None:
        return []
    return [shorthand_source(cfg, cfg.path)]
