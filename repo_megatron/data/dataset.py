"""Prompt datasets: local jsonl/parquet files or Hugging Face datasets, read with ``datasets``
and validated row by row.

Every problem is a :class:`DataError` naming the source (its file), the row (1-based) and the
column.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import os
from typing import Any, Optional

from ..config.data import DataConfig
from ..rollout.types import Prompt
from .chat import ChatFormatter
from ..errors import DataError
from .sources import Source, resolve_sources, shorthand_source

_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _kind(value: Any) -> str:
    """A JSON value's type name, for messages."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {str: "string", list: "list", dict: "object", type(None): "null"}.get(
        type(value), type(value).__name__)


_UTF16_32_BOMS = (codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE, codecs.BOM_UTF16_LE,
                  codecs.BOM_UTF16_BE)


def find_jsonl_problem(path: str, label: Optional[str] = None) -> Optional[DataError]:
    """The first line of a jsonl file that is not UTF-8 text holding a JSON object (what makes
    ``datasets`` fail with an error that names no line), or None; ``label`` names the file
    (default: its path)."""
    label = label or path
    with open(path, "rb") as f:
        if f.read(4).startswith(_UTF16_32_BOMS):
            return DataError(label, "is UTF-16 or UTF-32 text: save it as UTF-8")
        f.seek(0)
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as e:
                return DataError(label, f"is not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                                        f"{e.start + 1})", line_no)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                return DataError(label, f"not valid JSON ({e.msg} at column {e.colno})", line_no)
            except RecursionError:
                return DataError(label, "nested too deeply to read", line_no)
            if not isinstance(record, dict):
                return DataError(label, f"must be a JSON object, got {_kind(record)}", line_no)
    return None


def jsonl_lines_are_objects(path: str) -> bool:
    """Whether every non-blank line of a jsonl file (not UTF-16/32) starts like a JSON object.
    A cheap byte scan: pyarrow 26's JSON reader (under ``datasets``) dies with a segmentation
    fault on a file whose first line is ``null`` and whose next line is an object, so such
    files never reach it."""
    with open(path, "rb") as f:
        if f.read(4).startswith(_UTF16_32_BOMS):
            return False
        f.seek(0)
        for line_no, line in enumerate(f, start=1):
            line = line.strip()
            if line_no == 1:
                line = line.removeprefix(codecs.BOM_UTF8).strip()
            if line and not line.startswith(b"{"):
                return False
    return True


def read_table(path: str, key: str = "data.path", label: Optional[str] = None):
    """The file as a ``datasets.Dataset`` (jsonl or parquet, chosen by extension). Errors name
    the file as ``label`` (default: its path) and a missing file by its config ``key``."""
    import datasets

    label = label or path
    if not os.path.exists(path):
        raise DataError(label, f"no such file ({key})")
    if os.path.isdir(path):
        raise DataError(label, f"is a directory, not a .jsonl or .parquet file ({key})")
    fmt = _FORMATS.get(os.path.splitext(path)[1].lower())
    if fmt is None:
        raise DataError(label, f"unsupported file type (use {', '.join(_FORMATS)})")
    if path.lower().endswith(".jsonl") and not jsonl_lines_are_objects(path):
        raise find_jsonl_problem(path, label) or DataError(label, "has a line that is not a JSON "
                                                                  "object")
    try:
        return datasets.load_dataset(fmt, data_files=path, split="train")
    except Exception as e:  # datasets/Arrow errors name neither row nor column: find them
        problem = find_jsonl_problem(path, label) if fmt == "json" else None
        text = (str(e).strip().splitlines() or [""])[0][:300]
        raise (problem or DataError(label, f"cannot be read: {type(e).__name__}: {text}")) from None


def read_source(source: Source):
    """A source's rows as a ``datasets.Dataset``: its file, or ``split`` of its Hugging Face
    dataset (a Hub name, read from the local cache when offline, or a dataset directory)."""
    if source.path is not None:
        return read_table(source.path, source.location_key, source.label)
    import datasets

    try:
        return datasets.load_dataset(source.dataset, source.subset, split=source.split)
    except Exception as e:  # Hub, cache and split errors: keep the first line, name the source
        first = (str(e).strip().splitlines() or [""])[0]
        raise DataError(source.label, f"cannot load {source.where} ({source.location_key}): "
                                      f"{type(e).__name__}: {first}") from None


def check_columns(source: Source, columns: list[str]) -> None:
    """Every configured column exists; the error names the config key to change."""
    for name in ("question", "answer", "solution"):
        column = source.columns[name]
        if column is None or column in columns:
            continue
        hint = f" (or {source.keys['solution']}: null to train without solutions)" \
            if name == "solution" else ""
        raise DataError(source.label, f"no column {column!r} ({source.keys[name]}); the "
                                      f"{'file' if source.path else 'dataset'} has "
                                      f"{', '.join(columns)}{hint}", column=column)


def text_field(path: str, row: int, column: str, value: Any, optional: bool = False) -> Optional[str]:
    """A row's cell as text: strings as they are, numbers (answers) formatted; empty or null is
    an error unless ``optional`` (then None)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if value is None or (isinstance(value, str) and not value.strip()):
        if optional:
            return None
        raise DataError(path, "is empty", row, column)
    if not isinstance(value, str):
        raise DataError(path, f"must be text, got {_kind(value)}", row, column)
    return value


def _prompt(source: Source, row: int, record: dict, formatter: ChatFormatter,
            max_prompt_tokens: int) -> Prompt:
    """One validated row of ``source`` as a :class:`Prompt`."""
    label, cols = source.label, source.columns
    question = text_field(label, row, cols["question"], record[cols["question"]])
    answer = text_field(label, row, cols["answer"], record[cols["answer"]])
    solution = None if cols["solution"] is None else text_field(
        label, row, cols["solution"], record[cols["solution"]], optional=True)
    prompt_ids = formatter.prompt_ids(question)
    if len(prompt_ids) > max_prompt_tokens:
        raise DataError(label, f"prompt is {len(prompt_ids)} tokens, more than "
                               f"data.max_prompt_tokens={max_prompt_tokens}",
                        row, cols["question"])
    return Prompt(uid=f"{source.name}:{row}", question=question, answer=answer,
                  prompt_ids=tuple(prompt_ids), solution=solution, source=source.name)


def load_source(source: Source, formatter: ChatFormatter, max_prompt_tokens: int) -> list[Prompt]:
    """Validated :class:`Prompt` s of ``source`` (uids ``NAME:ROW``, prompt ids through the chat
    template). A row without a solution gets ``solution=None`` (no injection for it)."""
    table = read_source(source)
    check_columns(source, table.column_names)
    label = source.label
    prompts = []
    try:
        for index, record in enumerate(table):
            prompts.append(_prompt(source, index + 1, record, formatter, max_prompt_tokens))
    except UnicodeDecodeError:  # Arrow keeps invalid UTF-8 bytes until a row is read
        path = source.path or ""
        problem = find_jsonl_problem(path, label) if path.endswith((".jsonl", ".json")) else None
        raise (problem or DataError(label, "is not UTF-8 text")) from None
    if not prompts:
        raise DataError(label, "has no rows")
    return prompts


def load_prompts(cfg: DataConfig, formatter: ChatFormatter, path: Optional[str] = None) -> list[Prompt]:
    """The prompts of file ``path`` (default ``cfg.path``) with the data-level columns."""
    key = "data.path" if path is None else "data.eval_path"
    path = path or cfg.path
    if path is None:
        raise _not_set()
    source = dataclasses.replace(shorthand_source(cfg, path), location_key=key)
    return load_source(source, formatter, cfg.max_prompt_tokens)


def load_sources(cfg: DataConfig, formatter: ChatFormatter) -> list[tuple[Source, list[Prompt]]]:
    """Every source of the run (``data.sources``, or ``data.path``) with its prompts."""
    sources = resolve_sources(cfg)
    if not sources:
        raise _not_set()
    return [(source, load_source(source, formatter, cfg.max_prompt_tokens)) for source in sources]


def _not_set() -> DataError:
    return DataError("data.path", "not set: give a .jsonl or .parquet file of prompts "
                                  "(or data.sources)")
