"""This process's resident memory from ``/proc/self`` (Linux): the current size and the peak
since the last reset, which is how the weight-sync memory bound is measured."""

from __future__ import annotations


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024          # kB
    raise RuntimeError(f"/proc/self/status has no {field}")


def rss_bytes() -> int:
    """Resident set size now."""
    return _status("VmRSS")


def peak_rss_bytes() -> int:
    """Highest resident set size since :func:`reset_peak_rss` (or the process start)."""
    return _status("VmHWM")


def reset_peak_rss() -> None:
    """Start a new peak from the current size (``clear_refs`` 5, Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def return_freed_memory(threshold: int = 64 << 10) -> None:
    """Make glibc serve allocations above ``threshold`` bytes with mmap and give them back on
    free. By default it raises that threshold after each large free and keeps later tensors in
    its heap, where freed memory still counts as resident: the peak would then measure the
    allocator's history, not the live tensors. (``mallopt(M_MMAP_THRESHOLD)``, glibc only.)"""
    import ctypes

    M_MMAP_THRESHOLD = -3
    ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, threshold)
