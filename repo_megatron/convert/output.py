"""Output directories that appear whole or not at all.

:func:`atomic_directory` hands out a temporary sibling of the destination; when the block
succeeds, its files are fsynced and the directory takes the destination's place in one
``rename`` (an existing destination is swapped out atomically with ``renameat2(RENAME_EXCHANGE)``
and then deleted), so readers see the old directory or the new one, never a mix. When the block
fails, the temporary directory is removed and the destination is untouched. A destination
that is already a non-empty directory (without ``overwrite``) is an :class:`OutputExistsError`,
whether found at the start or when another process filled it meanwhile.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import shutil
import tempfile
from typing import Iterator

from ..errors import ConversionError, OutputExistsError
from ..runtime.fs import fsync_path

log = logging.getLogger(__name__)

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def check_output_directory(out: str, overwrite: bool, flag: str = "--out") -> None:
    """Refuse a destination that is a file, or a non-empty directory unless ``overwrite``."""
    if os.path.lexists(out) and not os.path.isdir(out):
        raise ConversionError(f"{flag} {out}: exists and is not a directory")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise OutputExistsError(f"{flag} {out}: directory is not empty (pass --overwrite to "
                                "replace it whole)")


def fsync_tree(directory: str) -> None:
    """fsync every file and directory under ``directory`` (the directory included)."""
    for root, dirs, files in os.walk(directory):
        for name in files:
            fsync_path(os.path.join(root, name))
        fsync_path(root)


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux ``renameat2``); False where that is unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False  # the file system cannot exchange: fall back to two renames
    raise OSError(code, os.strerror(code), b)


def _replace(tmp: str, out: str) -> None:
    """Put directory ``tmp`` in the place of ``out`` (which may exist)."""
    parent = os.path.dirname(out)
    if not os.path.isdir(out):
        os.rename(tmp, out)
    elif not os.listdir(out):
        os.rename(tmp, out)  # rename(2) replaces an empty directory
    elif _exchange(tmp, out):
        shutil.rmtree(tmp)  # now holds the old directory
    else:
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=parent)
        os.rename(out, os.path.join(old, "old"))
        os.rename(tmp, out)
        shutil.rmtree(old)
    fsync_path(parent)


def leftovers(out: str) -> list[str]:
    """Temporary siblings of ``out`` that an interrupted (killed) run left behind."""
    parent, name = os.path.split(os.path.abspath(out))
    if not os.path.isdir(parent):
        return []
    return sorted(os.path.join(parent, n) for n in os.listdir(parent)
                  if n.startswith((f".{name}.tmp-", f".{name}.old-")))


@contextlib.contextmanager
def atomic_directory(out: str, overwrite: bool = False, flag: str = "--out") -> Iterator[str]:
    """Yield an empty temporary directory beside ``out``; on success it replaces ``out``.

    ``out`` must not be a file, nor a non-empty directory unless ``overwrite``. On any error
    (or interrupt) the temporary directory is deleted and ``out`` is left as it was."""
    out = os.path.abspath(out)
    check_output_directory(out, overwrite, flag)
    for path in leftovers(out):
        log.warning("%s was left by an interrupted run; delete it if no other run is writing %s",
                    path, out)
    parent = os.path.dirname(out)
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    except OSError as e:
        raise ConversionError(f"{flag} {out}: cannot create a directory there ({e.strerror})") \
            from None
    try:
        yield tmp
        fsync_tree(tmp)
        # Checked again: another process may have filled the destination meanwhile.
        check_output_directory(out, overwrite, flag)
        try:
            if overwrite:
                _replace(tmp, out)
            else:  # rename(2) replaces only an empty directory (or none)
                os.rename(tmp, out)
                fsync_path(parent)
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST) or overwrite:
                raise
            # lost a race: another process renamed its complete copy into place after the
            # check above; rename(2) refused to replace it, so theirs stands, intact
            raise OutputExistsError(f"{flag} {out}: directory is not empty (another process "
                                    f"wrote it meanwhile)") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
