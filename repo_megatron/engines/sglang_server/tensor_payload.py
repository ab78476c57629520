"""The server side of ``/update_weights_from_tensor``: untrusted bytes to ``(name, tensor)``.

Each entry of ``serialized_named_tensors`` is ``base64(pickle)``, and unpickling runs whatever
callables the pickle names. Only the globals SGLang's own ``SafeUnpickler``
(``python/sglang/srt/utils/common.py``, sglang 0.5.23) admits are loaded here, so this server
accepts exactly the payloads a real SGLang server accepts:

- with the sglang wheel installed, SGLang's ``MultiprocessingSerializer.deserialize`` and
  ``FlattenedTensorBucket`` do the work themselves;
- without it, :class:`SafeUnpickler` applies a copy of SGLang's allow-list (a test compares
  the two sets whenever the wheel is present), including SGLang's replacement of
  ``torch.storage._load_from_bytes`` (which runs an unrestricted ``torch.load``) by a
  ``weights_only=True`` load.

Anything else is refused with :class:`PayloadError` (a 400 for the client).
"""

from __future__ import annotations

import base64
import importlib
import io
import pickle
from typing import Any, Optional

import torch

from ...weight_sync.flattened_bucket import FlattenedTensorMetadata

SGLANG_BUCKET_MODULE = "sglang.srt.weight_sync.tensor_bucket"

# SGLang 0.5.23's SafeUnpickler.ALLOWED_GLOBALS, verbatim.
_TENSOR_TYPES = ("BFloat16", "Bool", "Byte", "Char", "Double", "Float", "Half", "Int", "Long",
                 "Short")
_STORAGE_TYPES = ("BFloat16", "Bool", "Byte", "Char", "ComplexDouble", "ComplexFloat", "Double",
                  "Float", "Half", "Int", "Long", "QInt32", "QInt8", "QUInt2x4", "QUInt4x2",
                  "QUInt8", "Short")
_CUDA_STORAGE_TYPES = ("BFloat16", "Bool", "Byte", "Char", "ComplexDouble", "ComplexFloat",
                       "Double", "Float", "Half", "Int", "Long", "Short")
_DTYPES = (
    "bcomplex32", "bfloat16", "bit", "bits16", "bits1x8", "bits2x4", "bits4x2", "bits8", "bool",
    "cdouble", "cfloat", "chalf", "complex128", "complex32", "complex64", "double", "float",
    "float16", "float32", "float4_e2m1fn_x2", "float64", "float8_e4m3fn", "float8_e4m3fnuz",
    "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu", "half", "int", "int1", "int16", "int2",
    "int3", "int32", "int4", "int5", "int6", "int64", "int7", "int8", "long", "qint32", "qint8",
    "quint2x4", "quint4x2", "quint8", "short", "uint1", "uint16", "uint2", "uint3", "uint32",
    "uint4", "uint5", "uint6", "uint64", "uint7", "uint8")
SGLANG_ALLOWED_GLOBALS = frozenset({
    *(("builtins", n) for n in ("bool", "bytearray", "bytes", "complex", "dict", "float",
                                "frozenset", "int", "list", "range", "set", "slice", "str",
                                "tuple")),
    *(("collections", n) for n in ("OrderedDict", "defaultdict", "deque", "Counter")),
    ("copyreg", "__newobj__"), ("copyreg", "__newobj_ex__"), ("functools", "partial"),
    ("itertools", "chain"), ("itertools", "repeat"),
    ("multiprocessing.reduction", "_rebuild_partial"),
    ("multiprocessing.reduction", "_rebuild_socket"),
    ("multiprocessing.resource_sharer", "DupFd"), ("types", "SimpleNamespace"),
    ("_codecs", "encode"),
    ("torch", "Tensor"),
    *((module, f"{t}Tensor") for module in ("torch", "torch.cuda") for t in _TENSOR_TYPES),
    *((module, f"{t}Tensor") for module in ("torch.sparse", "torch.cuda.sparse")
      for t in _TENSOR_TYPES if t != "Bool"),
    ("torch", "Size"), ("torch", "device"), ("torch", "dtype"),
    *(("torch", d) for d in _DTYPES),
    ("torch.nn.parameter", "Parameter"), ("torch.serialization", "_get_layout"),
    *(("torch._utils", f"_rebuild_{n}") for n in (
        "tensor", "tensor_v2", "tensor_v3", "parameter", "parameter_with_state", "qtensor",
        "sparse_tensor", "meta_tensor_no_storage", "wrapper_subclass",
        "device_tensor_from_numpy", "device_tensor_from_cpu_tensor")),
    ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch.storage", "UntypedStorage"), ("torch.storage", "_UntypedStorage"),
    ("torch.storage", "TypedStorage"), ("torch", "UntypedStorage"),
    *(("torch", f"{t}Storage") for t in _STORAGE_TYPES),
    *(("torch.cuda", f"{t}Storage") for t in _CUDA_STORAGE_TYPES),
    *(("torch.multiprocessing.reductions", n) for n in (
        "rebuild_tensor", "rebuild_meta_tensor", "rebuild_cuda_tensor", "rebuild_nested_tensor",
        "rebuild_sparse_coo_tensor", "rebuild_sparse_compressed_tensor", "rebuild_storage_fd",
        "rebuild_storage_filename", "rebuild_storage_empty", "rebuild_typed_storage",
        "rebuild_typed_storage_child")),
    ("sglang.srt.utils.patch_torch", "_rebuild_cuda_tensor_modified"),
    ("torch_npu.multiprocessing.reductions", "rebuild_npu_tensor"),
    ("sglang.srt.utils.patch_torch", "_rebuild_npu_tensor_modified"),
    *(("torch", f"per_{n}") for n in ("tensor_affine", "tensor_symmetric", "channel_affine",
                                      "channel_symmetric", "channel_affine_float_qparams")),
    ("sglang.srt.managers.io_struct", "GenerateReqInput"),
    ("sglang.srt.managers.io_struct", "EmbeddingReqInput"),
    ("sglang.srt.disaggregation.encoder.receiver", "EmbeddingData"),
    ("sglang.srt.managers.schedule_batch", "Modality"),
    ("sglang.srt.multimodal.modality", "Modality"),
    (SGLANG_BUCKET_MODULE, "FlattenedTensorMetadata"),
    (SGLANG_BUCKET_MODULE, "FlattenedTensorBucket"),
    ("sglang.srt.model_executor.model_runner_components.weight_updater", "LocalSerializedTensor"),
    ("sglang.srt.model_executor.model_runner", "LocalSerializedTensor"),
})


class PayloadError(ValueError):
    """A tensor payload this server refuses: not base64, a forbidden global, or malformed."""


def _sglang():
    """SGLang's (MultiprocessingSerializer, FlattenedTensorBucket), or None without the wheel."""
    try:
        from sglang.srt.utils import MultiprocessingSerializer
        from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket
    except ImportError:
        return None
    return MultiprocessingSerializer, FlattenedTensorBucket


def backend() -> str:
    """``"sglang"`` when SGLang's own deserialiser is used, else ``"repo_megatron"``."""
    return "sglang" if _sglang() is not None else "repo_megatron"


def _load_storage_weights_only(data: bytes):
    """SGLang's stand-in for ``torch.storage._load_from_bytes``: a storage, loaded with
    ``weights_only=True`` (no code runs)."""
    storage = torch.load(io.BytesIO(data), weights_only=True)
    if not isinstance(storage, (torch.storage.TypedStorage, torch.UntypedStorage)):
        raise pickle.UnpicklingError(f"Expected a Torch storage, got {type(storage).__name__}")
    return storage


class SafeUnpickler(pickle.Unpickler):
    """SGLang's ``SafeUnpickler`` for machines without the sglang wheel: exactly its
    allow-list; its bucket metadata class loads as ours (same fields)."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return _load_storage_weights_only
        if (module, name) not in SGLANG_ALLOWED_GLOBALS:
            raise PayloadError(f"Blocked unsafe global ({module}.{name}) during pickle "
                               f"deserialization")
        if (module, name) == (SGLANG_BUCKET_MODULE, "FlattenedTensorMetadata"):
            try:
                importlib.import_module(module)
            except ImportError:
                return FlattenedTensorMetadata
        return super().find_class(module, name)


def deserialize(entry: Any) -> Any:
    """One ``serialized_named_tensors`` entry (base64 text) as the object it encodes."""
    if not isinstance(entry, str):
        raise PayloadError("serialized_named_tensors entries must be base64 strings")
    sglang = _sglang()
    try:
        if sglang is not None:
            return sglang[0].deserialize(entry)
        return SafeUnpickler(io.BytesIO(base64.b64decode(entry, validate=True))).load()
    except PayloadError:
        raise
    except Exception as e:      # a hostile pickle can make the loaders raise nearly anything
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise PayloadError(f"{type(e).__name__}: {first_line[:300]}") from e


def named_tensors(payload: Any, load_format: Optional[str]) -> list[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` pairs of a deserialised payload: a flattened bucket
    (``load_format="flattened_bucket"``, rebuilt as SGLang's ``FlattenedTensorBucket`` does)
    or a list of ``(name, tensor)`` pairs (``load_format`` None)."""
    if load_format == "flattened_bucket":
        if not isinstance(payload, dict) or not isinstance(payload.get("flattened_tensor"),
                                                           torch.Tensor):
            raise PayloadError("a flattened bucket is {'flattened_tensor': tensor, "
                               "'metadata': [...]}")
        metadata = payload.get("metadata")
        if not isinstance(metadata, list):
            raise PayloadError("a flattened bucket's metadata must be a list")
        try:
            sglang = _sglang()
            if sglang is not None:
                pairs = sglang[1](flattened_tensor=payload["flattened_tensor"],
                                  metadata=metadata).reconstruct_tensors()
            else:
                flat = payload["flattened_tensor"]
                pairs = [(meta.name, flat[meta.start_idx:meta.end_idx].view(meta.dtype)
                          .reshape(meta.shape)) for meta in metadata]
        except (AttributeError, TypeError, ValueError, RuntimeError, IndexError) as e:
            raise PayloadError(f"malformed flattened bucket: {type(e).__name__}: {e}") from e
    elif load_format is None:
        pairs = payload
    else:
        raise PayloadError(f"load_format {load_format!r} is not supported "
                           f"(None or 'flattened_bucket')")
    if not isinstance(pairs, (list, tuple)) or not all(
            isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[0], str)
            and isinstance(p[1], torch.Tensor) for p in pairs):
        raise PayloadError("the payload must hold (name, tensor) pairs")
    return [(name, tensor) for name, tensor in pairs]
