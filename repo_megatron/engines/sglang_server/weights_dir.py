"""``/update_weights_from_disk``: safetensors shards from a directory under the allowed root.

The server reads weights only below ``--weights-root`` (none given: it reads none). A
``model_path`` that is missing, not a directory, or outside the root (symlinks resolved) gets
one and the same answer, so the endpoint tells a client nothing about the file system outside
the root. Shards named by ``model.safetensors.index.json`` must lie inside ``model_path``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import torch

from .gate import brief


class WeightsDirError(ValueError):
    """A weight directory this server will not read (the message is safe to send back)."""


def inside(path: str, directory: str) -> bool:
    """Whether the resolved ``path`` is ``directory`` or below it (``directory`` resolved)."""
    return os.path.commonpath([path, directory]) == directory


def weight_directory(root: Optional[str], model_path: Any) -> str:
    """The resolved ``model_path`` (relative paths are relative to ``root``), if it is a
    directory under ``root``."""
    if root is None:
        raise WeightsDirError("this server loads no weights from disk: start it with "
                              "--weights-root DIR to allow /update_weights_from_disk below DIR")
    refused = WeightsDirError(f"model_path {brief(model_path)} is not a weight directory under "
                              f"this server's --weights-root")
    if not isinstance(model_path, str) or not model_path or "\0" in model_path:
        raise refused
    root = os.path.realpath(root)
    path = os.path.realpath(os.path.join(root, model_path))
    if not inside(path, root) or not os.path.isdir(path):
        raise refused
    return path


def shard_files(directory: str) -> list[str]:
    """The shards to read: those of the index if there is one, else every ``*.safetensors``."""
    index = os.path.join(directory, "model.safetensors.index.json")
    if not os.path.exists(index):
        files = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
        if not files:
            raise WeightsDirError("model_path holds no .safetensors file")
        return [os.path.join(directory, n) for n in files]
    try:
        with open(index, "rb") as f:
            weight_map = json.load(f)["weight_map"]
        names = sorted(set(weight_map.values()), key=str)
    except (OSError, ValueError, RecursionError, KeyError, TypeError, AttributeError) as e:
        raise WeightsDirError(f"model.safetensors.index.json has no readable weight_map "
                              f"({type(e).__name__})") from None
    paths = []
    for name in names:
        path = os.path.realpath(os.path.join(directory, name)) if isinstance(name, str) else ""
        if not path or not inside(path, directory):
            raise WeightsDirError(f"weight_map entry {brief(name)} is not a file inside "
                                  f"model_path")
        paths.append(path)
    return paths


def read_weights_dir(root: Optional[str], model_path: Any) -> list[tuple[str, torch.Tensor]]:
    """Every tensor of the shards in ``model_path`` (see the module docstring)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = weight_directory(root, model_path)
    try:
        paths = shard_files(directory)
    except OSError as e:
        raise WeightsDirError(f"cannot list model_path: {e.strerror}") from None
    named: list[tuple[str, torch.Tensor]] = []
    for path in paths:
        try:
            named += load_file(path).items()
        except (OSError, ValueError, SafetensorError) as e:
            raise WeightsDirError(f"cannot read {os.path.basename(path)}: {e}") from None
    return named
