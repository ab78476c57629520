"""The error type of the data pipeline that reaches users (one line, no traceback): a leaf, so
the command line can catch it without importing the pipeline."""

from __future__ import annotations

from typing import Optional


class DataError(ValueError):
    """``<file>: row <n>, column <c>: <what is wrong>``."""

    def __init__(self, path: str, message: str, row: Optional[int] = None,
                 column: Optional[str] = None):
        where = "".join([f", row {row}" if row is not None else "",
                         f", column {column!r}" if column is not None else ""])
        super().__init__(f"{path}{where}: {message}")
        self.path, self.row, self.column = path, row, column
