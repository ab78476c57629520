"""Moving tensor bytes between files: planned writes, executed by a few threads.

Both converters reduce a conversion to writes at known offsets of the output files
(:class:`Write`): byte ranges of input files (copied in the kernel with ``copy_file_range``,
as ``cp`` does: the bytes never enter this process) and zeros (vocabulary padding), or
tensors computed in memory (:class:`Computed`: layouts that are not whole-row moves, dtype
casts).
:func:`run_writes` executes them on a small thread pool, input order kept per thread so the
disk sees long sequential runs; computed writes run one at a time (memory stays within one
region and its outputs).
"""

from __future__ import annotations

import errno
import os
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence, Union

BLOCK = 16 << 20            # user-space copies: 16 MiB preadv/pwrite calls
COPY_CHUNK = 256 << 20       # copy_file_range request (writeback is started after each)

# copy_file_range is refused across some file systems / kernels: fall back to pread/pwrite.
_NO_KERNEL_COPY = (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF)


def pread_into(fd: int, buffer, offset: int) -> None:
    """Fill ``buffer`` (any writable buffer) with the file's bytes from ``offset``."""
    view = memoryview(buffer).cast("B")
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:done + BLOCK]], offset + done)
        if n == 0:
            raise EOFError(f"file ends {len(view) - done} bytes early (offset {offset})")
        done += n


def pwrite_all(fd: int, buffer, offset: int) -> None:
    """Write all of ``buffer`` at ``offset`` of ``fd``."""
    view = memoryview(buffer).cast("B")
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:done + COPY_CHUNK], offset + done)


def _copy_user_space(src: int, src_offset: int, dst: int, dst_offset: int, nbytes: int) -> None:
    buf = bytearray(min(BLOCK, nbytes))
    done = 0
    while done < nbytes:
        view = memoryview(buf)[:min(BLOCK, nbytes - done)]
        pread_into(src, view, src_offset + done)
        pwrite_all(dst, view, dst_offset + done)
        done += len(view)


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Have the kernel start writing a just-written range to disk now instead of once the
    dirty-page threshold is reached (10% of memory by default), so the disk writes from the
    first copy on and the final fsync waits less. ``POSIX_FADV_DONTNEED`` starts writeback of
    dirty pages without waiting for it (and drops the range from the cache once clean)."""
    os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)


def copy_range(src: int, src_offset: int, dst: int, dst_offset: int, nbytes: int) -> None:
    """Copy ``nbytes`` from ``src_offset`` of fd ``src`` to ``dst_offset`` of fd ``dst``,
    inside the kernel where the file system allows it; writeback starts as it goes."""
    done = 0
    while done < nbytes:
        try:
            n = os.copy_file_range(src, dst, min(COPY_CHUNK, nbytes - done),
                                   src_offset + done, dst_offset + done)
        except OSError as e:
            if e.errno not in _NO_KERNEL_COPY:
                raise
            _copy_user_space(src, src_offset + done, dst, dst_offset + done, nbytes - done)
            return
        if n == 0:
            raise EOFError(f"file ends {nbytes - done} bytes early (offset {src_offset})")
        start_writeback(dst, dst_offset + done, n)
        done += n


def prefetch(paths: Sequence[str], budget: int) -> threading.Thread:
    """Start reading ``paths`` (files, or the files of directories in name order), in order and
    at most ``budget`` bytes, into the page cache on a daemon thread, while the caller does
    other work (importing torch from a cold cache takes seconds): later reads then find the
    bytes in memory. The bytes go to ``/dev/null`` with ``sendfile``, so they never enter this
    process (``POSIX_FADV_WILLNEED`` would be the obvious call, but the kernel caps it at one
    readahead window). A hint only: errors end it silently."""
    def files():
        for path in paths:
            if os.path.isdir(path):
                yield from (os.path.join(path, n) for n in sorted(os.listdir(path)))
            else:
                yield path

    def run():
        left = budget
        try:
            with open(os.devnull, "wb") as null:
                for path in files():
                    if left <= 0:
                        return
                    if not os.path.isfile(path):
                        continue
                    with open(path, "rb") as f:
                        offset, end = 0, min(os.fstat(f.fileno()).st_size, left)
                        while offset < end:
                            n = os.sendfile(null.fileno(), f.fileno(), offset,
                                            min(COPY_CHUNK, end - offset))
                            if n == 0:
                                break
                            offset += n
                    left -= offset
        except OSError:
            pass

    thread = threading.Thread(target=run, name="prefetch", daemon=True)
    thread.start()
    return thread


@dataclass(frozen=True)
class FileRange:
    """``nbytes`` of input file ``path`` from ``offset``."""
    path: str
    offset: int
    nbytes: int


@dataclass(frozen=True)
class Zeros:
    nbytes: int


@dataclass(frozen=True)
class Write:
    """``pieces`` (file ranges or zeros) written one after the other into ``dst`` from
    ``dst_offset``."""
    dst: str
    dst_offset: int
    pieces: tuple[Union[FileRange, Zeros], ...]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.pieces)


@dataclass(frozen=True)
class Computed:
    """Bytes computed in memory: ``compute()`` yields ``(path, offset, bytes-like)`` one at a
    time (so memory holds one input region and one output); ``nbytes`` in total."""
    compute: Callable[[], Iterable[tuple[str, int, object]]]
    nbytes: int


class _Files:
    """Descriptors by path (all I/O is positional): one per thread for reading, since the
    kernel keeps readahead state per open file and two threads reading different places
    through one descriptor defeat it (measured: 2 threads exporting from one ``.distcp`` file
    took 40 s with a shared descriptor, 25 s on 1 thread); one shared for writing."""

    def __init__(self):
        self._fds: dict[tuple[str, bool, int], int] = {}
        self._lock = threading.Lock()

    def fd(self, path: str, write: bool) -> int:
        with self._lock:
            key = (path, write, 0 if write else threading.get_ident())
            if key not in self._fds:
                self._fds[key] = os.open(path, os.O_RDWR if write else os.O_RDONLY)
            return self._fds[key]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _execute(w: Union[Write, Computed], files: _Files, compute_lock: threading.Lock,
             on_bytes: Callable[[int], None], failed: threading.Event) -> None:
    if failed.is_set():
        return  # another write failed: the run is over
    try:
        _execute_one(w, files, compute_lock, on_bytes)
    except BaseException:
        failed.set()
        raise


def _execute_one(w: Union[Write, Computed], files: _Files, compute_lock: threading.Lock,
                 on_bytes: Callable[[int], None]) -> None:
    if isinstance(w, Computed):
        with compute_lock:
            for path, offset, data in w.compute():
                try:
                    pwrite_all(files.fd(path, write=True), data, offset)
                except OSError as e:
                    raise OSError(e.errno, e.strerror, e.filename or path) from None
                on_bytes(memoryview(data).nbytes)
        return
    dst, offset = files.fd(w.dst, write=True), w.dst_offset
    for piece in w.pieces:
        try:
            if isinstance(piece, Zeros):
                zeros = bytes(min(BLOCK, piece.nbytes))
                for start in range(0, piece.nbytes, BLOCK):
                    pwrite_all(dst, zeros[:min(BLOCK, piece.nbytes - start)], offset + start)
            else:
                copy_range(files.fd(piece.path, write=False), piece.offset, dst, offset,
                           piece.nbytes)
        except OSError as e:  # name the file: copy_file_range errors carry none
            raise OSError(e.errno, e.strerror, e.filename or w.dst) from None
        offset += piece.nbytes
        on_bytes(piece.nbytes)


def run_writes(writes: Sequence[Union[Write, Computed]], threads: int = 2,
               on_bytes: Callable[[int], None] = lambda n: None) -> None:
    """Execute ``writes`` (destination files must exist) on ``threads`` threads, each taking
    the next write in order. The first error (or an interrupt) stops the rest and is raised."""
    files, compute_lock, failed = _Files(), threading.Lock(), threading.Event()
    pool = ThreadPoolExecutor(threads, thread_name_prefix="convert")
    futures = []
    try:
        futures = [pool.submit(_execute, w, files, compute_lock, on_bytes, failed)
                   for w in writes]
        wait(futures, return_when=FIRST_EXCEPTION)
    except BaseException:
        failed.set()
        raise
    finally:
        for f in futures:
            f.cancel()
        pool.shutdown(wait=True)
        files.close()
    for f in futures:
        if not f.cancelled() and f.exception() is not None:
            raise f.exception()
