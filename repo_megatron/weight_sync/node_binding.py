"""Which colocated engine each group of trainer ranks feeds: the one on its own node.

A CUDA-IPC handle opens only on the node that made it, so trainer ranks ``e*tp .. e*tp+tp-1``
must post to an engine on their own node. The order of the worker list says nothing about
nodes (sgl-router's ``GET /workers`` lists workers in the order of a map keyed by random
UUIDs, not the ``--worker-urls`` order), so engines are matched by what they report: the host
of their URL, against the names and addresses of the node each group of ranks runs on. Several
engines on one node go to that node's groups in port order (the launchers give the engines of
a node increasing ports in GPU order). A worker reached by a loopback address runs where the
engine's rank (rank 0) runs.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Sequence
from urllib.parse import urlsplit

LOOPBACK_NAMES = ("localhost", "localhost.localdomain")


def node_names() -> frozenset[str]:
    """How this node may appear in a worker URL: its host names (full and short) and
    addresses, lower case."""
    names = {socket.gethostname(), socket.getfqdn()}
    try:
        host, aliases, addresses = socket.gethostbyname_ex(socket.gethostname())
        names.update([host, *aliases, *addresses])
    except OSError:             # a node whose own name does not resolve: names only
        pass
    return frozenset({n.lower() for n in names} | {n.lower().split(".")[0] for n in names
                                                   if not _is_address(n)})


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _is_loopback(host: str) -> bool:
    return host in LOOPBACK_NAMES or (_is_address(host) and ipaddress.ip_address(host).is_loopback)


def bind_engines(workers: Sequence[str], group_nodes: Sequence[frozenset[str]],
                 engine_node: frozenset[str]) -> list[str]:
    """The worker URL of each group of trainer ranks, in group order. ``workers``: the URLs
    in any order; ``group_nodes[e]``: :func:`node_names` of the node of group ``e``;
    ``engine_node``: that of the engine's rank (where a loopback URL runs). RuntimeError, in
    one line naming the group and the workers, where a group's node has no engine left."""
    def host(url: str) -> str:
        return (urlsplit(url).hostname or "").lower()

    def on(url: str, node: frozenset[str]) -> bool:
        h = host(url)
        if _is_loopback(h):
            return node == engine_node
        return h in node or (not _is_address(h) and h.split(".")[0] in node)

    def port(url: str) -> int:
        return urlsplit(url).port or 0

    left = sorted(workers, key=lambda url: (port(url), host(url)))
    bound = []
    for e, node in enumerate(group_nodes):
        mine = [url for url in left if on(url, node)]
        if not mine:
            name = min(node, key=lambda n: (_is_address(n), -len(n))) if node else "?"
            raise RuntimeError(
                f"weight_sync=tensor: trainer ranks of engine group {e} run on {name}, but no "
                f"engine left on that node among {sorted(workers)}: CUDA-IPC handles open only "
                f"on the node that made them (start one server per node, on the trainer's "
                f"GPUs, or use weight_sync=distributed)")
        bound.append(mine[0])
        left.remove(mine[0])
    return bound
