"""The payload of ``/update_weights_from_tensor`` with ``load_format="flattened_bucket"``.

SGLang (``srt/weight_sync/tensor_bucket.py``: ``FlattenedTensorBucket``; ``srt/utils``:
``MultiprocessingSerializer``, ``SafeUnpickler``; ``srt/model_executor/.../weight_updater.py``:
``_update_weights_from_flattened_bucket``) has TP rank i deserialise entry i of
``serialized_named_tensors`` with its ``SafeUnpickler`` to ``{"flattened_tensor": 1-D tensor,
"metadata": [objects with name, shape, dtype, start_idx, end_idx, numel]}`` and rebuild every
tensor as ``flattened_tensor[start_idx:end_idx].view(dtype).reshape(shape)``. Each entry is
``base64(pickle)``.

- **CUDA tensors** (the colocated GPU case) travel as CUDA-IPC handles, so the payload must be
  SGLang's own: SGLang's ``monkey_patch_torch_reductions`` (devices by UUID, not by index),
  ``FlattenedTensorBucket`` and ``MultiprocessingSerializer``. Without SGLang importable this
  refuses with a clear error rather than send handles SGLang would map to the wrong GPU.
- **CPU tensors** travel by value (a CPU tensor through ``ForkingPickler`` would be a file
  descriptor of this process). The payload then holds only what SGLang's ``SafeUnpickler``
  admits: dicts, lists, ``types.SimpleNamespace`` metadata, ``torch.Size``, dtypes and torch's
  own tensor rebuild functions. SGLang is not imported for it: importing SGLang patches
  transformers in the importing process. Buckets are one dtype, offsets in elements, which
  SGLang's readers before and after its multi-dtype (byte offset) buckets both rebuild.

The server side (unpickling through SGLang's allow-list) is
:mod:`repo_megatron.engines.sglang_server.tensor_payload`.
"""

from __future__ import annotations

import base64
import pickle
import types
from typing import Any

import torch

from .buckets import Bucket

def sglang_ipc():
    """SGLang's (FlattenedTensorBucket, MultiprocessingSerializer) with its torch reductions
    patched in, or None when SGLang does not import."""
    try:
        from sglang.srt.utils import MultiprocessingSerializer
        from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
        from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket
    except ImportError:
        return None
    monkey_patch_torch_reductions()
    return FlattenedTensorBucket, MultiprocessingSerializer


def dtype_groups(bucket: Bucket, multi_dtype: bool = False) -> list[Bucket]:
    """The bucket as flattened-tensor groups: all of it when the flattener takes mixed
    dtypes, else same-dtype runs in order of first appearance."""
    if multi_dtype:
        return [bucket] if bucket else []
    groups: dict[torch.dtype, Bucket] = {}
    for name, tensor in bucket:
        groups.setdefault(tensor.dtype, []).append((name, tensor))
    return list(groups.values())


def flatten_by_value(bucket: Bucket) -> dict[str, Any]:
    """One same-dtype bucket as ``{"flattened_tensor", "metadata"}`` (element offsets)."""
    metadata, start = [], 0
    for name, tensor in bucket:
        numel = tensor.numel()
        metadata.append(types.SimpleNamespace(name=name, shape=tensor.shape, dtype=tensor.dtype,
                                              start_idx=start, end_idx=start + numel,
                                              numel=numel))
        start += numel
    flattened = torch.cat([tensor.detach().reshape(-1).cpu() for _, tensor in bucket])  # [sum numel]
    return {"flattened_tensor": flattened, "metadata": metadata}


def serialize_by_value(obj: Any) -> str:
    """``base64(pickle)`` as SGLang's ``MultiprocessingSerializer.serialize(obj,
    output_str=True)`` makes it, with CPU tensors pickled by value."""
    return base64.b64encode(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)).decode("ascii")


def bucket_payloads(bucket: Bucket) -> list[str]:
    """The serialised flattened buckets of ``bucket`` (one per dtype group, or one when
    SGLang's bucket takes mixed dtypes), for this process's engine TP rank."""
    if not bucket:
        return []
    on_gpu = bucket[0][1].device.type != "cpu"
    if not on_gpu:
        return [serialize_by_value(flatten_by_value(group)) for group in dtype_groups(bucket)]
    sglang = sglang_ipc()
    if sglang is None:
        raise RuntimeError("weight_sync=tensor with GPU tensors needs SGLang importable in the "
                           "trainer (its monkey_patch_torch_reductions and "
                           "MultiprocessingSerializer make the CUDA-IPC handles); install "
                           "sglang or use weight_sync=distributed")
    flattener, serializer = sglang
    payloads = []
    for group in dtype_groups(bucket, getattr(flattener, "supports_multi_dtypes", False)):
        flat = flattener(named_tensors=group)
        payloads.append(serializer.serialize({"flattened_tensor": flat.get_flattened_tensor(),
                                              "metadata": flat.get_metadata()},
                                             output_str=True))
    return payloads


class FlattenedTensorMetadata(types.SimpleNamespace):
    """Stands in for SGLang's dataclass of that name when a payload made by SGLang is loaded
    without SGLang (same attributes)."""
