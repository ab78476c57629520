"""The payload of ``/update_weights_from_tensor`` with ``load_format="flattened_bucket"``.

SGLang (``python/sglang/srt/weight_sync/tensor_bucket.py``: ``FlattenedTensorBucket``;
``python/sglang/srt/utils``: ``MultiprocessingSerializer``; ``model_runner.py``:
``_update_weights_from_flattened_bucket``) deserialises each entry of
``serialized_named_tensors`` -- one per engine TP rank -- to
``{"flattened_tensor": 1-D tensor, "metadata": [FlattenedTensorMetadata(name, shape, dtype,
start_idx, end_idx, numel)]}`` and rebuilds every tensor as
``flattened_tensor[start_idx:end_idx].reshape(shape)``. Each entry is
``base64(ForkingPickler.dumps(obj))``.

Where SGLang is importable (the colocated GPU case, where trainer and servers share a node)
its own classes build the payload, so the bytes are exactly what it expects, GPU tensors
travelling as CUDA IPC handles. Without SGLang (CPU, ``repo-megatron serve``) an equivalent
dataclass is used and CPU tensors are pickled by value: a CPU tensor through ForkingPickler
would travel as a file descriptor, which means nothing to another process over HTTP. The
server side (unpickling through SGLang's allow-list) is ``repo_megatron.serve.tensor_payload``.
"""

from __future__ import annotations

import base64
import io
import pickle
import types
from dataclasses import dataclass
from multiprocessing.reduction import ForkingPickler
from typing import Any

import torch

from .base import Bucket


@dataclass
class FlattenedTensorMetadata:
    """Where one tensor lives in a flattened bucket (SGLang's field names). It pickles as a
    ``types.SimpleNamespace`` with the same fields: SGLang's SafeUnpickler admits that class
    (not this module), and SGLang reads the metadata by attribute."""
    name: str
    shape: torch.Size
    dtype: torch.dtype
    start_idx: int
    end_idx: int
    numel: int

    def __reduce__(self):
        return types.SimpleNamespace, (), dict(vars(self))


def _sglang_classes():
    """SGLang's (FlattenedTensorBucket, MultiprocessingSerializer), or None without SGLang."""
    try:
        from sglang.srt.utils import MultiprocessingSerializer
        from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket
    except ImportError:
        return None
    return FlattenedTensorBucket, MultiprocessingSerializer


def flatten(bucket: Bucket) -> dict[str, Any]:
    """One same-dtype bucket as ``{"flattened_tensor", "metadata"}``."""
    sglang = _sglang_classes()
    if sglang is not None:
        flat = sglang[0](named_tensors=bucket)
        return {"flattened_tensor": flat.get_flattened_tensor(), "metadata": flat.get_metadata()}
    metadata, start = [], 0
    for name, tensor in bucket:
        numel = tensor.numel()
        metadata.append(FlattenedTensorMetadata(name, tensor.shape, tensor.dtype, start,
                                                start + numel, numel))
        start += numel
    flattened = torch.cat([tensor.reshape(-1) for _, tensor in bucket])  # [sum numel]
    return {"flattened_tensor": flattened, "metadata": metadata}


def serialize(obj: Any) -> str:
    """``base64(pickle)`` as SGLang's ``MultiprocessingSerializer.serialize(obj,
    output_str=True)``; CPU tensors by value (see the module docstring)."""
    sglang = _sglang_classes()
    tensor = obj.get("flattened_tensor") if isinstance(obj, dict) else None
    on_cpu = tensor is None or tensor.device.type == "cpu"
    if sglang is not None and not on_cpu:
        return sglang[1].serialize(obj, output_str=True)
    buf = io.BytesIO()
    (pickle.Pickler if on_cpu else ForkingPickler)(buf).dump(obj)
    return base64.b64encode(buf.getvalue()).decode("ascii")
