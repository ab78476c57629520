"""SGLang's native HTTP protocol as pure functions: request bodies, response parsing, versions.

Shapes follow SGLang 0.5.x (``python/sglang/srt/managers/io_struct.py``: ``GenerateReqInput``,
``python/sglang/srt/sampling/sampling_params.py``: ``SamplingParams``). A ``/generate`` body
carries only fields that sglang-router keeps when it re-serialises the request (it drops
unknown ones), so a body means the same thing whether it goes to a worker or to the router.
"""

from __future__ import annotations

import re
from typing import Any, Optional

from ..base import GenerationResult, SamplingParams

# SGLang renamed /get_server_info to /server_info in 0.5.9. Its PyPI wheels refuse tensor and
# distributed weight updates outside /begin_weight_update ... /end_weight_update from 0.5.21 on
# (forks carry the endpoints under older numbers: the client detects them, `serve` emulates
# this version's behaviour).
SERVER_INFO_RENAMED = (0, 5, 9)
WEIGHT_UPDATE_SESSION = (0, 5, 21)


def parse_version(text: str) -> tuple[int, ...]:
    """``"0.5.23"`` / ``"0.5.9.post1"`` / ``"0.5.22rc0"`` -> ``(0, 5, 23)`` ... (release part)."""
    match = re.match(r"\s*v?(\d+(?:\.\d+)*)", str(text))
    if match is None:
        raise ValueError(f"not an SGLang version: {text!r}")
    return tuple(int(part) for part in match.group(1).split("."))


def sampling_params_json(params: SamplingParams) -> dict[str, Any]:
    """``sampling_params`` of a ``/generate`` body. ``top_k == -1`` and ``top_p == 1`` are
    SGLang's "off" too; ``no_stop_trim`` keeps the stop token in ``output_ids`` like the
    embedded engine; ``sampling_seed`` makes the sample reproducible per request."""
    body: dict[str, Any] = {
        "temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k,
        "max_new_tokens": params.max_new_tokens, "skip_special_tokens": True,
        "no_stop_trim": True,
    }
    if params.stop:
        body["stop"] = list(params.stop)
    if params.stop_token_ids:
        body["stop_token_ids"] = list(params.stop_token_ids)
    if params.seed is not None:
        body["sampling_seed"] = int(params.seed)
    return body


def generate_body(input_ids: list[int], params: SamplingParams,
                  rid: Optional[str] = None) -> dict[str, Any]:
    """One ``/generate`` request asking for the sampled tokens' log-probs."""
    body: dict[str, Any] = {"input_ids": list(input_ids),
                            "sampling_params": sampling_params_json(params),
                            "return_logprob": True}
    if rid is not None:
        body["rid"] = rid
    return body


def parse_weight_version(value: Any) -> Optional[int]:
    """A response's ``weight_version`` as an int; None for SGLang's initial ``"default"``."""
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def generation_result(response: dict[str, Any]) -> GenerationResult:
    """A ``/generate`` response (one request) as a :class:`GenerationResult`.

    ``meta_info.output_token_logprobs`` entries are ``[logprob, token_id, text|null]``;
    ``finish_reason`` is ``{"type": "stop"|"length"|"abort", "matched": ...}``.
    """
    meta = response.get("meta_info") or {}
    finish = meta.get("finish_reason") or {}
    entries = meta.get("output_token_logprobs") or []
    token_ids = response.get("output_ids")
    if token_ids is None:
        token_ids = [int(entry[1]) for entry in entries]
    version = parse_weight_version(meta.get("weight_version"))
    return GenerationResult(token_ids=[int(t) for t in token_ids],
                            text=response.get("text", ""),
                            logprobs=[float(entry[0]) for entry in entries],
                            finish_reason=finish.get("type", "stop"),
                            weight_version=0 if version is None else version,
                            matched_stop=finish.get("matched"))


def error_message(status: int, text: str) -> str:
    """The message of an SGLang error body (``{"error": {"message"}}``, ``{"message"}`` or
    FastAPI's ``{"detail"}``), else the raw text."""
    import json

    try:
        body = json.loads(text)
    except ValueError:
        return text.strip()[:500] or f"HTTP {status}"
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and "message" in error:
            return str(error["message"])
        for key in ("message", "detail"):
            if key in body:
                return str(body[key])
    return text.strip()[:500]


# -- control and weight request bodies (fields of SGLang's io_struct request classes) ----------
ABORT_ALL = {"abort_all": True}                                       # AbortReq
EMPTY = {}          # BeginWeightUpdateReqInput, EndWeightUpdateReqInput, ContinueGenerationReqInput


def pause_body(mode: str) -> dict:
    """``PauseGenerationReqInput``: ``abort`` | ``retract`` | ``in_place``."""
    return {"mode": mode}


# SGLang's memory regions (``sglang.srt.constants.GPU_MEMORY_ALL_TYPES``, in its order)
KV_CACHE_TAG, WEIGHTS_TAG, CUDA_GRAPH_TAG = "kv_cache", "weights", "cuda_graph"
MEMORY_TAGS = (KV_CACHE_TAG, WEIGHTS_TAG, CUDA_GRAPH_TAG)


def memory_body(tags: Optional[list[str]] = None) -> dict:
    """``Release/ResumeMemoryOccupationReqInput``: all regions, or ``tags`` of
    :data:`MEMORY_TAGS`."""
    return {} if tags is None else {"tags": list(tags)}


def weight_version_body(version: int) -> dict:
    """``UpdateWeightVersionReqInput``; SGLang's default ``abort_all_requests=True`` would
    abort requests a ``retract`` / ``in_place`` pause is holding, so it is sent false."""
    return {"new_version": str(version), "abort_all_requests": False}


def disk_update_body(model_path: str) -> dict:
    """``UpdateWeightFromDiskReqInput``."""
    return {"model_path": model_path}


def tensor_update_body(entries: list[str]) -> dict:
    """``UpdateWeightsFromTensorReqInput``: ``entries[i]`` for engine TP rank i; the cache is
    flushed once after the whole update."""
    return {"serialized_named_tensors": list(entries), "load_format": "flattened_bucket",
            "flush_cache": False}


def init_group_body(master_address: str, master_port: int, rank_offset: int, world_size: int,
                    group_name: str, backend: str) -> dict:
    """``InitWeightsUpdateGroupReqInput``."""
    return {"master_address": master_address, "master_port": master_port,
            "rank_offset": rank_offset, "world_size": world_size, "group_name": group_name,
            "backend": backend}


def distributed_update_body(names: list[str], dtypes: list, shapes: list,
                            group_name: str) -> dict:
    """``UpdateWeightsFromDistributedReqInput`` announcing one broadcast bucket."""
    return {"names": list(names), "dtypes": [str(d).removeprefix("torch.") for d in dtypes],
            "shapes": [list(s) for s in shapes], "group_name": group_name,
            "flush_cache": False}


def destroy_group_body(group_name: str) -> dict:
    """``DestroyWeightsUpdateGroupReqInput``."""
    return {"group_name": group_name}
