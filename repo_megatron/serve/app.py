"""An HTTP server that speaks SGLang's native protocol, backed by the embedded CPU engine.

It follows SGLang 0.5.23's ``python/sglang/srt/entrypoints/http_server.py`` (routes, status
codes, ``{"success", "message"}`` answers of the weight endpoints, ``{"error": {"message"}}``
errors with status 400), ``python/sglang/srt/managers/io_struct.py`` (request fields:
``GenerateReqInput``, ``UpdateWeightFromDiskReqInput``, ``UpdateWeightsFromTensorReqInput``,
``InitWeightsUpdateGroupReqInput``, ``UpdateWeightsFromDistributedReqInput``, ``AbortReq``,
``UpdateWeightVersionReqInput``) and ``python/sglang/srt/managers/tokenizer_manager.py``
(``meta_info`` of a generation). ``--emulate-version`` switches the version-dependent parts:
``/server_info`` exists from 0.5.9 (``/get_server_info`` before), and from 0.5.22
``/begin_weight_update`` / ``/end_weight_update`` exist and tensor and distributed updates
are refused outside them.

Not served: streaming, images, LoRA, the OpenAI API beyond non-streaming chat completions
(:mod:`.openai`). Tensor updates are pickles (as in SGLang): bind to loopback unless every
client is trusted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import uuid
from typing import Any, Optional

import torch
from starlette.applications import Starlette
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ..rollout.engine import GenerationResult, SamplingParams
from ..sglang.protocol import SERVER_INFO_RENAMED, WEIGHT_UPDATE_SESSION, parse_version
from ..sglang.weight_sync import flattened_bucket
from ..sglang.weight_sync.process_group import broadcast_tensors, destroy, init_weight_update_group
from .openai import ChatCompletions
from .worker import EngineWorker, Request


SGLANG_DEFAULT_MAX_NEW_TOKENS = 128


class BadRequest(ValueError):
    """A request this server cannot serve: answered 400 with ``{"error": {"message"}}``."""


def error_response(message: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": {"message": message}}, status_code=status)


def weight_response(success: bool, message: str, **extra) -> JSONResponse:
    """The ``{"success", "message"}`` answer of SGLang's weight endpoints (400 on failure)."""
    return JSONResponse({"success": success, "message": message, **extra},
                        status_code=200 if success else 400)


def sampling_params(raw: Optional[dict]) -> SamplingParams:
    """SGLang ``sampling_params`` (unknown keys ignored) as engine sampling parameters."""
    raw = dict(raw or {})
    stop = raw.get("stop") or ()
    try:
        params = SamplingParams(
            temperature=float(raw.get("temperature", 1.0)), top_p=float(raw.get("top_p", 1.0)),
            top_k=int(raw.get("top_k", -1)),
            max_new_tokens=int(raw.get("max_new_tokens", SGLANG_DEFAULT_MAX_NEW_TOKENS)),
            stop=(stop,) if isinstance(stop, str) else tuple(stop),
            stop_token_ids=tuple(int(t) for t in raw.get("stop_token_ids") or ()),
            seed=None if raw.get("sampling_seed") is None else int(raw["sampling_seed"]))
    except (TypeError, ValueError) as e:
        raise BadRequest(f"invalid sampling_params: {e}") from e
    if params.temperature < 0 or not 0 < params.top_p <= 1 or params.max_new_tokens < 0:
        raise BadRequest(f"invalid sampling_params: {raw}")
    return params


def finish_reason(result: GenerationResult, params: SamplingParams) -> dict:
    if result.finish_reason == "length":
        return {"type": "length", "length": params.max_new_tokens}
    return {"type": "stop", "matched": result.matched_stop}


class SGLangServer:
    """State of one server: the engine worker, its version, weight version and update
    session, and the weight-update process groups it joined."""

    def __init__(self, worker: EngineWorker, model_path: str, version: str = "0.5.23"):
        self.worker, self.model_path = worker, model_path
        self.version = version
        self.weight_version = "default"
        self.in_update_session = False
        self.groups: dict[str, Any] = {}

    @property
    def _version(self) -> tuple[int, ...]:
        return parse_version(self.version)

    # -- info -------------------------------------------------------------------------------
    async def health(self, request: HTTPRequest) -> Response:
        return Response(status_code=200 if self.worker.status == "up" else 503)

    async def server_info(self, request: HTTPRequest) -> Response:
        if request.url.path == "/server_info" and self._version < SERVER_INFO_RENAMED:
            return error_response("Not Found", 404)
        return JSONResponse({"version": self.version, "model_path": self.model_path,
                             "tokenizer_path": self.model_path, "tp_size": 1, "dp_size": 1,
                             "weight_version": self.weight_version,
                             "status": self.worker.status, "internal_states": []})

    async def model_info(self, request: HTTPRequest) -> Response:
        return JSONResponse({"model_path": self.model_path, "tokenizer_path": self.model_path,
                             "is_generation": True, "weight_version": self.weight_version})

    async def get_weight_version(self, request: HTTPRequest) -> Response:
        return JSONResponse({"weight_version": self.weight_version})

    # -- generation -------------------------------------------------------------------------
    async def generate(self, request: HTTPRequest) -> Response:
        if self.worker.status != "up":
            return error_response("the server is starting", 503)
        try:
            body = await request.json()
            if body.get("stream"):
                raise BadRequest("stream=true is not supported by repo-megatron serve")
            batch, requests = self.parse_generate(body)
        except BadRequest as e:
            return error_response(str(e))
        except ValueError as e:
            return error_response(f"invalid JSON: {e}")
        start = time.perf_counter()
        outcomes = await self.worker.generate(requests)
        answers = [self.answer(r, o, time.perf_counter() - start)
                   for r, o in zip(requests, outcomes)]
        return JSONResponse(answers if batch else answers[0])

    def parse_generate(self, body: dict) -> tuple[bool, list[Request]]:
        """(is a batch, the requests) of a ``GenerateReqInput`` body."""
        ids = body.get("input_ids")
        if ids is None:
            text = body.get("text")
            if text is None:
                raise BadRequest("either text or input_ids should be provided")
            tokenizer = self.worker.engine.tokenizer
            ids = ([tokenizer.encode(t) for t in text] if isinstance(text, list)
                   else tokenizer.encode(text))
        batch = bool(ids) and isinstance(ids[0], list)
        rows = ids if batch else [ids]
        if not rows or any(not row for row in rows):
            raise BadRequest("input_ids must not be empty")
        raw_params = body.get("sampling_params")
        raw_params = raw_params if isinstance(raw_params, list) else [raw_params] * len(rows)
        rids = body.get("rid")
        rids = rids if isinstance(rids, list) else (
            [rids] if rids else [uuid.uuid4().hex for _ in rows])
        if len(raw_params) != len(rows) or len(rids) != len(rows):
            raise BadRequest("sampling_params and rid must match input_ids in length")
        return batch, [Request(str(rid), [int(t) for t in row], sampling_params(raw))
                       for row, raw, rid in zip(rows, raw_params, rids)]

    def answer(self, request: Request, outcome: object, latency: float) -> dict:
        """One request's answer in SGLang's shape (``text``, ``output_ids``, ``meta_info``)."""
        meta = {"id": request.rid, "prompt_tokens": len(request.input_ids), "cached_tokens": 0,
                "weight_version": self.weight_version, "e2e_latency": latency}
        if not isinstance(outcome, GenerationResult):       # aborted
            meta.update(finish_reason={"type": "abort", "message": str(outcome)},
                        completion_tokens=0, output_token_logprobs=[],
                        input_token_logprobs=[])
            return {"text": "", "output_ids": [], "meta_info": meta}
        meta.update(finish_reason=finish_reason(outcome, request.params),
                    completion_tokens=len(outcome.token_ids),
                    # logprob_start_len=-1: only the last prompt token, whose log-prob is None
                    input_token_logprobs=[[None, request.input_ids[-1], None]],
                    output_token_logprobs=[[lp, tok, None] for lp, tok in
                                           zip(outcome.logprobs, outcome.token_ids)])
        return {"text": outcome.text, "output_ids": outcome.token_ids, "meta_info": meta}

    async def abort_request(self, request: HTTPRequest) -> Response:
        body = await self.json_body(request)
        self.worker.abort(None if body.get("abort_all") else body.get("rid"))
        return Response(status_code=200)

    async def pause_generation(self, request: HTTPRequest) -> Response:
        await self.worker.pause()
        return JSONResponse({"message": "Generation paused successfully.", "status": "ok"})

    async def continue_generation(self, request: HTTPRequest) -> Response:
        self.worker.resume()
        return JSONResponse({"message": "Generation continued successfully.", "status": "ok"})

    async def flush_cache(self, request: HTTPRequest) -> Response:
        # SGLang does not flush while requests run or wait (the radix cache is in use)
        return PlainTextResponse(
            "Cache flushed.\nPlease check backend logs for more details. (When there are "
            "running or waiting requests, the operation will not be performed.)\n",
            status_code=400 if self.worker.busy else 200)

    # -- weights ----------------------------------------------------------------------------
    async def begin_weight_update(self, request: HTTPRequest) -> Response:
        if self._version < WEIGHT_UPDATE_SESSION:
            return error_response("Not Found", 404)
        if self.in_update_session:
            return weight_response(False, "a weight update session is already open")
        self.in_update_session = True
        return weight_response(True, "Weight update session begun.")

    async def end_weight_update(self, request: HTTPRequest) -> Response:
        if self._version < WEIGHT_UPDATE_SESSION:
            return error_response("Not Found", 404)
        if not self.in_update_session:
            return weight_response(False, "no weight update session is open")
        self.in_update_session = False
        return weight_response(True, "Weight update session ended.")

    def session_refusal(self, endpoint: str) -> Optional[Response]:
        """SGLang >= 0.5.22 refuses tensor/distributed updates outside a session."""
        if self._version >= WEIGHT_UPDATE_SESSION and not self.in_update_session:
            return weight_response(False, f"{endpoint} must be called between "
                                          f"/begin_weight_update and /end_weight_update")
        return None

    async def load_named_tensors(self, named: list[tuple[str, torch.Tensor]],
                                 body: dict) -> Optional[str]:
        """Abort if asked, load on the engine thread, set the weight version; the error
        message or None."""
        if body.get("abort_all_requests"):
            self.worker.abort_all()
        try:
            await self.worker.on_engine_thread(self.worker.engine.update_weights, named)
        except (KeyError, ValueError, RuntimeError) as e:
            return str(e)
        if body.get("weight_version") is not None:
            self.weight_version = str(body["weight_version"])
        return None

    async def update_weights_from_disk(self, request: HTTPRequest) -> Response:
        body = await self.json_body(request)
        path = body.get("model_path", "")
        try:
            named = await asyncio.to_thread(read_safetensors_dir, path)
        except (OSError, ValueError) as e:
            return weight_response(False, f"Failed to read weights from {path!r}: {e}",
                                   num_paused_requests=0)
        error = await self.load_named_tensors(named, body)
        return weight_response(error is None, error or "Succeeded to update model weights.",
                               num_paused_requests=0)

    async def update_weights_from_tensor(self, request: HTTPRequest) -> Response:
        refusal = self.session_refusal("/update_weights_from_tensor")
        if refusal is not None:
            return refusal
        body = await self.json_body(request)
        entries = body.get("serialized_named_tensors") or []
        if not entries:
            return weight_response(False, "serialized_named_tensors is empty")
        try:
            payload = flattened_bucket.deserialize(entries[0])      # this server is TP rank 0
            if body.get("load_format") == "flattened_bucket":
                named = flattened_bucket.reconstruct(payload)
            else:
                named = [(name, tensor) for name, tensor in payload]
        except Exception as e:                  # any malformed payload is the client's error
            return weight_response(False, f"Failed to deserialize the tensors: {e}")
        error = await self.load_named_tensors(named, body)
        return weight_response(error is None, error or "Succeeded to update model weights.")

    async def init_weights_update_group(self, request: HTTPRequest) -> Response:
        body = await self.json_body(request)
        name = body.get("group_name", "weight_update_group")
        try:
            self.groups[name] = await asyncio.to_thread(
                init_weight_update_group, body.get("backend", "nccl"), body["master_address"],
                int(body["master_port"]), int(body["world_size"]), int(body["rank_offset"]),
                name)
        except Exception as e:                  # rendezvous, backend or missing fields
            return weight_response(False, f"Failed to init the process group {name}: {e}")
        return weight_response(True, "Succeeded to initialize custom process group.")

    async def update_weights_from_distributed(self, request: HTTPRequest) -> Response:
        refusal = self.session_refusal("/update_weights_from_distributed")
        if refusal is not None:
            return refusal
        body = await self.json_body(request)
        group = self.groups.get(body.get("group_name", "weight_update_group"))
        if group is None:
            return weight_response(False, f"no process group {body.get('group_name')!r}: "
                                          f"call /init_weights_update_group first")
        tensors = [torch.empty(shape, dtype=getattr(torch, dtype))
                   for dtype, shape in zip(body["dtypes"], body["shapes"])]
        await self.worker.on_engine_thread(broadcast_tensors, group, tensors)
        error = await self.load_named_tensors(list(zip(body["names"], tensors)), body)
        return weight_response(error is None,
                               error or "Succeeded to update parameter online from distributed.")

    async def destroy_weights_update_group(self, request: HTTPRequest) -> Response:
        body = await self.json_body(request)
        group = self.groups.pop(body.get("group_name", "weight_update_group"), None)
        if group is None:
            return weight_response(False, "no such process group")
        destroy(group)
        return weight_response(True, "Succeeded to destroy custom process group.")

    async def update_weight_version(self, request: HTTPRequest) -> Response:
        body = await self.json_body(request)
        if body.get("abort_all_requests"):
            self.worker.abort_all()
        self.weight_version = str(body.get("new_version", ""))
        return JSONResponse({"success": True, "message": f"Weight version updated to "
                                                         f"{self.weight_version}",
                             "new_version": self.weight_version})

    @staticmethod
    async def json_body(request: HTTPRequest) -> dict:
        raw = await request.body()
        return json.loads(raw) if raw.strip() else {}

    # -- app --------------------------------------------------------------------------------
    def routes(self) -> list[Route]:
        get, post, both = ["GET"], ["POST"], ["GET", "POST"]
        table = [
            ("/health", self.health, get), ("/health_generate", self.health, get),
            ("/server_info", self.server_info, get), ("/get_server_info", self.server_info, get),
            ("/model_info", self.model_info, get), ("/get_model_info", self.model_info, get),
            ("/get_weight_version", self.get_weight_version, get),
            ("/generate", self.generate, ["POST", "PUT"]),
            ("/abort_request", self.abort_request, post),
            ("/pause_generation", self.pause_generation, post),
            ("/continue_generation", self.continue_generation, post),
            ("/flush_cache", self.flush_cache, both),
            ("/begin_weight_update", self.begin_weight_update, post),
            ("/end_weight_update", self.end_weight_update, post),
            ("/update_weights_from_disk", self.update_weights_from_disk, post),
            ("/update_weights_from_tensor", self.update_weights_from_tensor, post),
            ("/init_weights_update_group", self.init_weights_update_group, post),
            ("/update_weights_from_distributed", self.update_weights_from_distributed, post),
            ("/destroy_weights_update_group", self.destroy_weights_update_group, post),
            ("/update_weight_version", self.update_weight_version, post),
            ("/v1/chat/completions", ChatCompletions(self).completions, post),
        ]
        return [Route(path, handler, methods=methods) for path, handler, methods in table]

    def app(self) -> Starlette:
        """The ASGI app; the model loads in the background (``/health_generate`` is 503
        until it is ready)."""
        @contextlib.asynccontextmanager
        async def lifespan(app):
            loading = asyncio.create_task(self.worker.start())
            try:
                yield
            finally:
                loading.cancel()
                await self.worker.stop()

        return Starlette(routes=self.routes(), lifespan=lifespan,
                         exception_handlers={BadRequest: lambda r, e: error_response(str(e))})


def read_safetensors_dir(path: str) -> list[tuple[str, torch.Tensor]]:
    """Every tensor of the ``*.safetensors`` files in ``path`` (shards of the index if any)."""
    from safetensors.torch import load_file

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    if not files:
        raise ValueError("no .safetensors file")
    named: list[tuple[str, torch.Tensor]] = []
    for name in files:
        named += load_file(os.path.join(path, name)).items()
    return named
