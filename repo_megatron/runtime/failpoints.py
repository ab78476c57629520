"""Fail points: deterministic crashes at named places, for the tests that prove resumability.

``REPO_MEGATRON_FAILPOINT=<name>:<step>`` makes the process SIGKILL itself when it reaches
``failpoint(name, step)`` (nothing to clean up, no ``finally`` runs: a power cut). Unset, a
fail point is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "REPO_MEGATRON_FAILPOINT"


def failpoint(name: str, step: int) -> None:
    if os.environ.get(ENV) == f"{name}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
