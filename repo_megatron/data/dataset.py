"""Prompt datasets: local jsonl/parquet read with Hugging Face ``datasets``, validated row by row.

Every problem is a :class:`DataError` naming the file, the row (1-based) and the column.
"""

from __future__ import annotations

import codecs
import json
import os
from typing import Any, Optional

from ..config.data import DataConfig
from ..rollout.types import Prompt
from .chat import ChatFormatter

_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class DataError(ValueError):
    """``<file>: row <n>, column <c>: <what is wrong>``."""

    def __init__(self, path: str, message: str, row: Optional[int] = None,
                 column: Optional[str] = None):
        where = "".join([f", row {row}" if row is not None else "",
                         f", column {column!r}" if column is not None else ""])
        super().__init__(f"{path}{where}: {message}")
        self.path, self.row, self.column = path, row, column


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


def find_jsonl_problem(path: str) -> Optional[DataError]:
    """The first line of a jsonl file that is not UTF-8 text holding a JSON object (what makes
    ``datasets`` fail with an error that names no line), or None."""
    with open(path, "rb") as f:
        if f.read(4).startswith(_UTF16_32_BOMS):
            return DataError(path, "is UTF-16 or UTF-32 text: save it as UTF-8")
        f.seek(0)
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as e:
                return DataError(path, f"is not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                                       f"{e.start + 1})", line_no)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                return DataError(path, f"not valid JSON ({e.msg} at column {e.colno})", line_no)
            except RecursionError:
                return DataError(path, "nested too deeply to read", line_no)
            if not isinstance(record, dict):
                return DataError(path, f"must be a JSON object, got {_kind(record)}", line_no)
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


def read_table(path: str, key: str = "data.path"):
    """The file as a ``datasets.Dataset`` (jsonl or parquet, chosen by extension); ``key``
    names the config key that gave the path."""
    import datasets

    if not os.path.exists(path):
        raise DataError(path, f"no such file ({key})")
    if os.path.isdir(path):
        raise DataError(path, f"is a directory, not a .jsonl or .parquet file ({key})")
    fmt = _FORMATS.get(os.path.splitext(path)[1].lower())
    if fmt is None:
        raise DataError(path, f"unsupported file type (use {', '.join(_FORMATS)})")
    if path.lower().endswith(".jsonl") and not jsonl_lines_are_objects(path):
        raise find_jsonl_problem(path) or DataError(path, "has a line that is not a JSON object")
    try:
        return datasets.load_dataset(fmt, data_files=path, split="train")
    except Exception as e:  # datasets/Arrow errors name neither row nor column: find them
        problem = find_jsonl_problem(path) if fmt == "json" else None
        text = (str(e).strip().splitlines() or [""])[0][:300]
        raise (problem or DataError(path, f"cannot be read: {type(e).__name__}: {text}")) from None


def check_columns(path: str, columns: list[str], cfg: DataConfig) -> None:
    """Every configured column exists; the error names the config key to change."""
    keys = [("question_key", cfg.question_key), ("answer_key", cfg.answer_key)]
    if cfg.solution_key is not None:
        keys.append(("solution_key", cfg.solution_key))
    for key, column in keys:
        if column not in columns:
            hint = " (or data.solution_key: null to train without solutions)" \
                if key == "solution_key" else ""
            raise DataError(path, f"no column {column!r} (data.{key}); the file has "
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


def _prompt(path: str, row: int, record: dict, cfg: DataConfig, formatter: ChatFormatter,
            stem: str) -> Prompt:
    """One validated row as a :class:`Prompt`."""
    question = text_field(path, row, cfg.question_key, record[cfg.question_key])
    answer = text_field(path, row, cfg.answer_key, record[cfg.answer_key])
    solution = None if cfg.solution_key is None else text_field(
        path, row, cfg.solution_key, record[cfg.solution_key], optional=True)
    prompt_ids = formatter.prompt_ids(question)
    if len(prompt_ids) > cfg.max_prompt_tokens:
        raise DataError(path, f"prompt is {len(prompt_ids)} tokens, more than "
                              f"data.max_prompt_tokens={cfg.max_prompt_tokens}",
                        row, cfg.question_key)
    return Prompt(uid=f"{stem}:{row}", question=question, answer=answer,
                  prompt_ids=tuple(prompt_ids), solution=solution)


def load_prompts(cfg: DataConfig, formatter: ChatFormatter, path: Optional[str] = None) -> list[Prompt]:
    """Validated :class:`Prompt` s of ``path`` (default ``cfg.path``), prompt ids through the
    chat template. A row without a solution gets ``solution=None`` (no injection for it)."""
    key = "data.path" if path is None else "data.eval_path"
    path = path or cfg.path
    if path is None:
        raise DataError("data.path", "not set: give a .jsonl or .parquet file of prompts")
    table = read_table(path, key)
    check_columns(path, table.column_names, cfg)
    stem = os.path.splitext(os.path.basename(path))[0]
    prompts = []
    try:
        for index, record in enumerate(table):
            prompts.append(_prompt(path, index + 1, record, cfg, formatter, stem))
    except UnicodeDecodeError:  # Arrow keeps invalid UTF-8 bytes until a row is read
        problem = find_jsonl_problem(path) if path.endswith((".jsonl", ".json")) else None
        raise (problem or DataError(path, "is not UTF-8 text")) from None
    if not prompts:
        raise DataError(path, "has no rows")
    return prompts
