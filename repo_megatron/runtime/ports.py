"""Free TCP ports (a leaf: the launcher, the rendezvous and weight sync all ask for one)."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free on ``host`` now: ``127.0.0.1`` for processes of this machine,
    ``""`` (every interface) for a port that processes on other hosts connect to."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
