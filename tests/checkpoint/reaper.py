"""``python -m tests.checkpoint.reaper CMD...``: run CMD and report what outlives it.

This process becomes a child subreaper (Linux ``PR_SET_CHILD_SUBREAPER``), so every process
CMD started, however deep, is re-parented here when its parent dies instead of vanishing
into init. After CMD exits, it waits up to 10 s for the descendants to go, then prints one
JSON line: CMD's return code, CMD's last output line, and the command lines of descendants
still alive (which it then kills).
"""

import ctypes
import json
import os
import subprocess
import sys
import tempfile
import time

import psutil

PR_SET_CHILD_SUBREAPER = 36


def _reap_zombies() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def main() -> None:
    cmd = sys.argv[1:]
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")
    # Output to a file: a pipe would stay open as long as any survivor holds it.
    with tempfile.TemporaryFile("w+") as out:
        returncode = subprocess.run(cmd, stdout=out).returncode
        out.seek(0)
        lines = out.read().strip().splitlines()
    survivors: list = []
    for _ in range(100):
        _reap_zombies()
        survivors = [p for p in psutil.Process().children(recursive=True)
                     if p.status() != psutil.STATUS_ZOMBIE]
        if not survivors:
            break
        time.sleep(0.1)
    alive = []
    for p in survivors:
        try:
            alive.append(" ".join(p.cmdline())[:200])
            p.kill()
        except psutil.NoSuchProcess:
            pass
    print(json.dumps({"returncode": returncode, "last_line": lines[-1] if lines else "",
                      "survivors": alive}))


if __name__ == "__main__":
    main()
