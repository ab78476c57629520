"""Errors for users: one line that says what is wrong and where, never a traceback.

A leaf (imports nothing of the package), so that any module can raise these and the command
line can catch them without loading what raised them. ``repo-megatron`` catches
:class:`UserError` once, prints ``TypeName: message`` and exits with the error's
``exit_code``: 2 for bad input (config, data, a checkpoint to convert), 1 for a run that
stopped on its own (a checkpoint it cannot save or trust).

Each type also derives from the builtin its callers caught before it existed (``ValueError``
for bad input, ``RuntimeError`` for checkpoints), so library code that catches those keeps
working.
"""

from __future__ import annotations

from typing import Optional


class UserError(Exception):
    """A problem the user can fix from the message alone: ``<source>: <message>``, where
    ``source`` (optional) names the file the problem is in."""

    exit_code = 2

    def __init__(self, message: str, source: Optional[str] = None):
        self.message = message
        self.source = source
        super().__init__(f"{source}: {message}" if source else message)

    def with_source(self, source: str) -> "UserError":
        """This error naming ``source``, unless it already names one."""
        return type(self)(self.message, source) if self.source is None else self


class ConfigError(UserError, ValueError):
    """A configuration or command-line problem: ``<source>: <key>=<value> <what is wrong>``."""


class DataError(UserError, ValueError):
    """A dataset problem: ``<file>, row <n>, column <c>: <what is wrong>``."""

    def __init__(self, path: str, message: str, row: Optional[int] = None,
                 column: Optional[str] = None):
        where = "".join([f", row {row}" if row is not None else "",
                         f", column {column!r}" if column is not None else ""])
        super().__init__(message, f"{path}{where}")
        self.path, self.row, self.column = path, row, column


class ConversionError(UserError, ValueError):
    """Input the checkpoint converters refuse (a corrupt or mismatched safetensors or
    torch_dist file, a bad flag, an occupied output directory): ``<file or flag>: <why>``."""


class OutputExistsError(ConversionError):
    """The converter's output directory is already a non-empty directory (and ``--overwrite``
    is off): another process may have written the same conversion."""


class CheckpointError(UserError, RuntimeError):
    """A training checkpoint could not be saved or trusted: ``<what> <where>: <why>``. The run
    stops; the checkpoints it has are kept."""

    exit_code = 1
