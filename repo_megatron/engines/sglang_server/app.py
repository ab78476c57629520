"""An HTTP server that speaks SGLang's native protocol, backed by the embedded CPU engine.

It follows SGLang 0.5.23's ``python/sglang/srt/entrypoints/http_server.py`` (routes, status
codes, auth levels, ``{"success", "message"}`` answers of the weight endpoints,
``{"error": {"message"}}`` errors with status 400), ``python/sglang/srt/managers/io_struct.py``
(request fields: ``GenerateReqInput``, ``UpdateWeightFromDiskReqInput``,
``UpdateWeightsFromTensorReqInput``, ``InitWeightsUpdateGroupReqInput``,
``UpdateWeightsFromDistributedReqInput``, ``AbortReq``, ``UpdateWeightVersionReqInput``,
``Release/ResumeMemoryOccupationReqInput``: the memory of colocated runs, taken out of service
with ``--enable-memory-saver`` as SGLang's ``scheduler_components/weight_updater.py`` does) and
``python/sglang/srt/managers/tokenizer_manager.py`` (``meta_info`` of a generation).
``--emulate-version`` switches the version-dependent parts: ``/server_info`` exists from
0.5.9 (``/get_server_info`` before), and from 0.5.22 ``/begin_weight_update`` /
``/end_weight_update`` exist and tensor and distributed updates are refused outside them.

Every request first passes :class:`~.gate.RequestGate` (API keys, no web pages, body size,
JSON content type); every field is then checked (:mod:`.generate_request` for generation),
so a client mistake is a 400, never a 500. Tensor payloads are unpickled only through
SGLang's allow-list (:mod:`.tensor_payload`), disk updates read only below ``weights_root``
(:mod:`.weights_dir`), and process groups join only hosts in ``weight_sync_hosts``.

To add a route: append it to :meth:`SGLangServer.routes` (mark management endpoints with
``@ADMIN``); the gate then covers it, and it reads its body with
:func:`~.gate.json_object` / :func:`~.gate.typed` and raises :class:`~.gate.BadRequest`.

Not served: streaming, images, LoRA, the OpenAI API beyond non-streaming chat completions
(:mod:`.openai`, behind the same gate).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ...weight_sync.process_group import broadcast_tensors, destroy, init_weight_update_group
from ..base import GenerationResult
from ..sglang.protocol import (KV_CACHE_TAG, MEMORY_TAGS, SERVER_INFO_RENAMED, WEIGHTS_TAG,
                               WEIGHT_UPDATE_SESSION, parse_version)
from . import tensor_payload
from .auth import AuthLevel, auth_level
from .gate import BadRequest, RequestGate, brief, error_response, json_object, typed
from .generate_request import GenerateItem, GenerateLimits, parse_generate
from .openai import ChatCompletions
from .weights_dir import WeightsDirError, read_weights_dir
from .worker import EngineWorker, Request

log = logging.getLogger(__name__)

ADMIN = auth_level(AuthLevel.ADMIN_OPTIONAL)   # SGLang's level for every management endpoint
LOOPBACK_NAMES = ("127.0.0.1", "::1", "localhost")


def in_update_session(endpoint):
    """A tensor or distributed update route: SGLang >= 0.5.22 refuses it outside
    ``/begin_weight_update`` ... ``/end_weight_update``."""
    @functools.wraps(endpoint)
    async def refuse_outside(self: "SGLangServer", request: HTTPRequest) -> Response:
        if self._version >= WEIGHT_UPDATE_SESSION and not self.in_update_session:
            return weight_response(False, f"{request.url.path} must be called between "
                                          f"/begin_weight_update and /end_weight_update")
        return await endpoint(self, request)
    return refuse_outside


def with_weights(endpoint):
    """A weight update route: refused while the weights' memory is released (module
    docstring), before its body is read."""
    @functools.wraps(endpoint)
    async def refuse_released(self: "SGLangServer", request: HTTPRequest) -> Response:
        out_of_service = self.out_of_service(WEIGHTS_TAG)
        if out_of_service:
            return weight_response(False, out_of_service)
        return await endpoint(self, request)
    return refuse_released


def this_host_names() -> tuple[str, ...]:
    """The names the trainer on this machine uses for itself (the default group hosts)."""
    return (*LOOPBACK_NAMES, socket.gethostname(), socket.getfqdn())


@dataclass
class ServeOptions:
    """What a server accepts (``repo-megatron serve`` flags)."""
    api_key: Optional[str] = None
    admin_api_key: Optional[str] = None
    weights_root: Optional[str] = None          # /update_weights_from_disk reads only below it
    weight_sync_hosts: tuple[str, ...] = ()     # /init_weights_update_group; () = this host
    max_body_bytes: int = 16 << 20
    max_admin_body_bytes: int = 4 << 30
    max_prompt_tokens: Optional[int] = None     # None: the model's context length
    max_new_tokens: Optional[int] = None        # None: the model's context length
    memory_saver: bool = False                  # --enable-memory-saver


def weight_response(success: bool, message: str, **extra) -> JSONResponse:
    """The ``{"success", "message"}`` answer of SGLang's weight endpoints (400 on failure)."""
    return JSONResponse({"success": success, "message": message, **extra},
                        status_code=200 if success else 400)


def finish_reason(result: GenerationResult, max_new_tokens: int) -> dict:
    if result.finish_reason == "length":
        return {"type": "length", "length": max_new_tokens}
    return {"type": "stop", "matched": result.matched_stop}


def weight_version_spans(events: Sequence[tuple[str, int]], current: str,
                         completion_tokens: int) -> list[dict]:
    """``meta_info["weight_versions"]`` of a response of ``completion_tokens`` tokens: which
    weight version sampled which tokens, ``[{"version", "start", "end"}]``. ``events`` are
    (the version before a change, tokens generated by then), ``current`` the version at the end
    (SGLang's ``compute_weight_version_spans`` and ``add_weight_versions_to_meta_info``)."""
    spans: list[dict] = []
    for version, end in [*events, (current, completion_tokens)]:
        end = min(end, completion_tokens)
        if spans and end <= spans[-1]["end"]:
            continue
        if spans and version == spans[-1]["version"]:
            spans[-1]["end"] = end
            continue
        spans.append({"version": version, "start": spans[-1]["end"] if spans else 0, "end": end})
    return [s for s in spans if s["start"] < completion_tokens or s["start"] == 0]


class SGLangServer:
    """State of one server: the engine worker, its version, weight version and update
    session, and the weight-update process groups it joined."""

    def __init__(self, worker: EngineWorker, model_path: str, version: str = "0.5.23",
                 options: Optional[ServeOptions] = None):
        self.worker, self.model_path = worker, model_path
        self.version = version
        self.options = options or ServeOptions()
        self.weight_version = "default"
        self.in_update_session = False
        self.released: set[str] = set()         # memory regions released (SGLang's offload_tags)
        self.groups: dict[str, Any] = {}
        self.joining = threading.Lock()         # one process-group rendezvous at a time

    @property
    def _version(self) -> tuple[int, ...]:
        return parse_version(self.version)

    @property
    def limits(self) -> GenerateLimits:
        """The loaded model's vocabulary and context, and the configured caps."""
        model = self.worker.engine.model
        vocab = model.get_input_embeddings().num_embeddings
        context = getattr(model.config, "max_position_embeddings", None) or 1 << 30
        return GenerateLimits(
            vocab_size=vocab, context_length=context,
            max_prompt_tokens=self.options.max_prompt_tokens or context,
            max_new_tokens=self.options.max_new_tokens or context)

    # -- info -------------------------------------------------------------------------------
    async def health(self, request: HTTPRequest) -> Response:
        return Response(status_code=200 if self.worker.status == "up" else 503)

    async def server_info(self, request: HTTPRequest) -> Response:
        if request.url.path == "/server_info" and self._version < SERVER_INFO_RENAMED:
            return error_response("Not Found", 404)
        return JSONResponse({"version": self.version, "model_path": self.model_path,
                             "tokenizer_path": self.model_path, "tp_size": 1, "dp_size": 1,
                             "weight_version": self.weight_version,
                             "enable_memory_saver": self.options.memory_saver,
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
        out_of_service = self.out_of_service(KV_CACHE_TAG, WEIGHTS_TAG)
        if out_of_service:
            return error_response(out_of_service)
        body = await json_object(request)
        # tokenising a long text takes a while: off the event loop
        batch, items = await asyncio.to_thread(
            parse_generate, body, self.limits, self.worker.engine.tokenizer.encode,
            lambda: uuid.uuid4().hex)
        for item in items:
            if self.worker.in_flight(item.rid):
                raise BadRequest(f"Duplicate request ID detected: {item.rid}")
        requests = [Request(item.rid, item.input_ids, item.params) for item in items]
        start = time.perf_counter()
        outcomes = await self.until_disconnected(request, requests)
        failed = [o for o in outcomes if isinstance(o, Exception)]
        if failed:
            return error_response(f"generation failed: {type(failed[0]).__name__}: "
                                  f"{failed[0]}", 500)
        answers = [self.answer(item, o, time.perf_counter() - start, r.version_events)
                   for item, o, r in zip(items, outcomes, requests)]
        return JSONResponse(answers if batch else answers[0])

    async def until_disconnected(self, request: HTTPRequest,
                                 requests: list[Request]) -> list[object]:
        """The requests' outcomes; if the client goes away first, they are aborted (as
        SGLang does), so nobody decodes for a closed connection."""
        outcomes = asyncio.ensure_future(self.worker.generate(requests))
        while not outcomes.done():
            if await request.is_disconnected():
                for r in requests:
                    self.worker.abort(r.rid, "client disconnected")
            await asyncio.wait([outcomes], timeout=0.5)
        return outcomes.result()

    def answer(self, item: GenerateItem, outcome: object, latency: float,
               version_events: Sequence[tuple[str, int]] = ()) -> dict:
        """One request's answer in SGLang's shape (``text``, ``output_ids``, ``meta_info``).
        ``weight_versions`` tells which tokens each weight version sampled (a request can run
        across an update that paused it), ``weight_version`` is the last of them."""
        tokens = len(outcome.token_ids) if isinstance(outcome, GenerationResult) else 0
        spans = weight_version_spans(version_events, self.weight_version, tokens)
        meta = {"id": item.rid, "prompt_tokens": len(item.input_ids), "cached_tokens": 0,
                "weight_version": spans[-1]["version"], "weight_versions": spans,
                "e2e_latency": latency}
        if not isinstance(outcome, GenerationResult):       # aborted
            meta.update(finish_reason={"type": "abort", "message": str(outcome)},
                        completion_tokens=0, output_token_logprobs=[],
                        input_token_logprobs=[])
            return {"text": "", "output_ids": [], "meta_info": meta}
        meta.update(finish_reason=finish_reason(outcome, item.params.max_new_tokens),
                    completion_tokens=len(outcome.token_ids),
                    # logprob_start_len=-1: only the last prompt token, whose log-prob is None
                    input_token_logprobs=[[None, item.input_ids[-1], None]],
                    output_token_logprobs=[[lp, tok, None] for lp, tok in
                                           zip(outcome.logprobs, outcome.token_ids)])
        return {"text": outcome.text, "output_ids": outcome.token_ids, "meta_info": meta}

    @ADMIN
    async def abort_request(self, request: HTTPRequest) -> Response:
        body = await json_object(request)
        if typed(body, "abort_all", bool, False):
            self.worker.abort_all()
        else:
            rid = typed(body, "rid", str, "")
            if rid:
                self.worker.abort(rid)
        return Response(status_code=200)

    @ADMIN
    async def pause_generation(self, request: HTTPRequest) -> Response:
        try:
            await self.worker.pause(typed(await json_object(request), "mode", str, "abort"))
        except ValueError as e:                 # not a mode
            raise BadRequest(str(e)) from None
        return JSONResponse({"message": "Generation paused successfully.", "status": "ok"})

    @ADMIN
    async def continue_generation(self, request: HTTPRequest) -> Response:
        self.worker.resume()
        return JSONResponse({"message": "Generation continued successfully.", "status": "ok"})

    @ADMIN
    async def flush_cache(self, request: HTTPRequest) -> Response:
        # SGLang does not flush while requests run or wait (the radix cache is in use)
        return PlainTextResponse(
            "Cache flushed.\nPlease check backend logs for more details. (When there are "
            "running or waiting requests, the operation will not be performed.)\n",
            status_code=400 if self.worker.busy else 200)

    # -- weights ----------------------------------------------------------------------------
    @ADMIN
    async def begin_weight_update(self, request: HTTPRequest) -> Response:
        if self._version < WEIGHT_UPDATE_SESSION:
            return error_response("Not Found", 404)
        if self.in_update_session:
            return weight_response(False, "a weight update session is already open")
        self.in_update_session = True
        return weight_response(True, "Weight update session begun.")

    @ADMIN
    async def end_weight_update(self, request: HTTPRequest) -> Response:
        if self._version < WEIGHT_UPDATE_SESSION:
            return error_response("Not Found", 404)
        if not self.in_update_session:
            return weight_response(False, "no weight update session is open")
        self.in_update_session = False
        return weight_response(True, "Weight update session ended.")

    def model_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shape of every parameter, under each of its names (tied ones have two)."""
        return {name: tuple(p.shape) for name, p in
                self.worker.engine.model.named_parameters(remove_duplicate=False)}

    async def load_named_tensors(self, named: list[tuple[str, torch.Tensor]],
                                 body: dict) -> Optional[str]:
        """Abort if asked, load on the engine thread, set the weight version; the error
        message or None."""
        version = typed(body, "weight_version", str)
        if typed(body, "abort_all_requests", bool, False):
            self.worker.abort_all()
        try:
            await self.worker.on_engine_thread(self.worker.engine.update_weights, named)
        except (KeyError, ValueError, RuntimeError, TypeError) as e:
            return str(e)
        if version is not None:
            self.set_weight_version(version)
        return None

    def set_weight_version(self, version: str) -> None:
        """The version answers report from now on; requests in flight record the change."""
        if version != self.weight_version:
            self.worker.record_weight_version(self.weight_version)
            self.weight_version = version

    @ADMIN
    @with_weights
    async def update_weights_from_disk(self, request: HTTPRequest) -> Response:
        body = await json_object(request)
        try:
            named = await asyncio.to_thread(read_weights_dir, self.options.weights_root,
                                            body.get("model_path"))
        except WeightsDirError as e:
            return weight_response(False, f"Failed to read weights: {e}",
                                   num_paused_requests=0)
        error = await self.load_named_tensors(named, body)
        return weight_response(error is None, error or "Succeeded to update model weights.",
                               num_paused_requests=0)

    @ADMIN
    @in_update_session
    @with_weights
    async def update_weights_from_tensor(self, request: HTTPRequest) -> Response:
        body = await json_object(request)
        entries = typed(body, "serialized_named_tensors", list, [])
        if not entries:
            return weight_response(False, "serialized_named_tensors is empty")
        try:       # this server is TP rank 0: it reads entry 0
            payload = await asyncio.to_thread(tensor_payload.deserialize, entries[0])
            named = tensor_payload.named_tensors(payload, typed(body, "load_format", str))
        except tensor_payload.PayloadError as e:
            return weight_response(False, f"Failed to deserialize the tensors: {e}")
        error = await self.load_named_tensors(named, body)
        return weight_response(error is None, error or "Succeeded to update model weights.")

    @ADMIN
    async def init_weights_update_group(self, request: HTTPRequest) -> Response:
        body = await json_object(request)
        name = typed(body, "group_name", str, "weight_update_group")
        address = typed(body, "master_address", str, "")
        port, world_size, rank_offset = (typed(body, key, int) for key in
                                         ("master_port", "world_size", "rank_offset"))
        backend = typed(body, "backend", str, "nccl")
        allowed = self.options.weight_sync_hosts or this_host_names()
        if address not in allowed:
            raise BadRequest(f"master_address {brief(address)} is not one of this server's "
                             f"--weight-sync-hosts {list(allowed)}")
        if port is None or not 0 < port < 65536 or world_size is None or rank_offset is None \
                or not 0 < rank_offset < world_size or backend not in ("gloo", "nccl"):
            raise BadRequest("init_weights_update_group needs master_port in [1, 65535], "
                             "0 < rank_offset < world_size and backend gloo or nccl")
        if name in self.groups or not self.joining.acquire(blocking=False):
            return weight_response(False, f"process group {name!r} exists or is being joined")
        try:
            self.groups[name] = await asyncio.to_thread(
                init_weight_update_group, backend, address, port, world_size, rank_offset, name)
        except Exception as e:                  # rendezvous or backend: logged, not echoed
            log.warning("joining process group %s at %s:%d failed: %s", name, address, port, e)
            return weight_response(False, f"Failed to init the process group {name} at "
                                          f"{address}:{port}")
        finally:
            self.joining.release()
        return weight_response(True, "Succeeded to initialize custom process group.")

    @ADMIN
    @in_update_session
    @with_weights
    async def update_weights_from_distributed(self, request: HTTPRequest) -> Response:
        body = await json_object(request)
        name = typed(body, "group_name", str, "weight_update_group")
        group = self.groups.get(name)
        if group is None:
            return weight_response(False, f"no process group {brief(name)}: call "
                                          f"/init_weights_update_group first")
        tensors = self.receive_buffers(typed(body, "names", list, []),
                                       typed(body, "dtypes", list, []),
                                       typed(body, "shapes", list, []))
        await self.worker.on_engine_thread(broadcast_tensors, group, [t for _, t in tensors])
        error = await self.load_named_tensors(tensors, body)
        return weight_response(error is None,
                               error or "Succeeded to update parameter online from distributed.")

    def receive_buffers(self, names: list, dtypes: list,
                        shapes: list) -> list[tuple[str, torch.Tensor]]:
        """Empty tensors for a broadcast, after checking that each names a parameter of the
        model with its shape (nothing else is ever allocated) and a torch dtype."""
        if not len(names) == len(dtypes) == len(shapes):
            raise BadRequest("names, dtypes and shapes must have the same length")
        known = self.model_shapes()
        buffers = []
        for name, dtype, shape in zip(names, dtypes, shapes):
            if not isinstance(name, str) or name not in known:
                raise BadRequest(f"{brief(name)} is not a parameter of the model")
            if not isinstance(shape, list) or tuple(shape) != known[name]:
                raise BadRequest(f"shape {brief(shape)} of {name} is not the model's "
                                 f"{list(known[name])}")
            if not isinstance(dtype, str) or not isinstance(getattr(torch, dtype, None),
                                                            torch.dtype):
                raise BadRequest(f"dtype {brief(dtype)} of {name} is not a torch dtype")
            buffers.append((name, torch.empty(shape, dtype=getattr(torch, dtype))))
        return buffers

    @ADMIN
    async def destroy_weights_update_group(self, request: HTTPRequest) -> Response:
        body = await json_object(request)
        group = self.groups.pop(typed(body, "group_name", str, "weight_update_group"), None)
        if group is None:
            return weight_response(False, "no such process group")
        destroy(group)
        return weight_response(True, "Succeeded to destroy custom process group.")

    @ADMIN
    async def update_weight_version(self, request: HTTPRequest) -> Response:
        body = await json_object(request)
        version = typed(body, "new_version", str, "")
        if typed(body, "abort_all_requests", bool, True):       # SGLang's default
            self.worker.abort_all()
        self.set_weight_version(version)
        return JSONResponse({"success": True, "message": f"Weight version updated to "
                                                         f"{self.weight_version}",
                             "new_version": self.weight_version})

    # -- memory (colocated runs) ---------------------------------------------------------------
    def out_of_service(self, *tags: str) -> Optional[str]:
        """Why a request that needs the memory regions ``tags`` cannot run now (None: it can).
        Only with ``--enable-memory-saver``: SGLang's released regions are then unmapped (a
        generation or weight load there would fault); without it its release frees nothing."""
        released = [t for t in tags if t in self.released] if self.options.memory_saver else []
        return (f"memory released ({', '.join(released)}): call /resume_memory_occupation "
                f"first" if released else None)

    @staticmethod
    def memory_tags(body: dict) -> list[str]:
        """``tags`` of a ``Release/ResumeMemoryOccupationReqInput``; none or empty = every
        region, as SGLang reads it."""
        tags = typed(body, "tags", list, [])
        if not all(isinstance(t, str) for t in tags):
            raise BadRequest("tags: expected a list of strings")
        return tags or list(MEMORY_TAGS)

    @ADMIN
    async def release_memory_occupation(self, request: HTTPRequest) -> Response:
        tags = self.memory_tags(await json_object(request))
        # SGLang asserts an idle scheduler (requests a retract pause holds do not count)
        if self.worker.busy:
            return error_response("release_memory_occupation should be called only when "
                                  "server is idle.")
        self.released.update(tags)
        log.info("memory released: %s", ", ".join(tags))
        return JSONResponse(None)

    @ADMIN
    async def resume_memory_occupation(self, request: HTTPRequest) -> Response:
        tags = self.memory_tags(await json_object(request))
        held = [t for t in tags if t not in self.released]
        if held:           # SGLang's offload_tags.remove(tag) raises KeyError
            return error_response(repr(held[0]))
        self.released.difference_update(tags)
        log.info("memory resumed: %s", ", ".join(tags))
        return JSONResponse(None)

    # -- app --------------------------------------------------------------------------------
    def routes(self) -> list[Route]:
        get, post, both = ["GET"], ["POST"], ["GET", "POST"]

        def posts(*names: str) -> list:       # POST /<name>, served by the method <name>
            return [(f"/{name}", getattr(self, name), post) for name in names]

        table = [
            ("/health", self.health, get), ("/health_generate", self.health, get),
            ("/server_info", self.server_info, get), ("/get_server_info", self.server_info, get),
            ("/model_info", self.model_info, get), ("/get_model_info", self.model_info, get),
            ("/get_weight_version", self.get_weight_version, get),
            ("/generate", self.generate, ["POST", "PUT"]),
            *posts("abort_request", "pause_generation", "continue_generation"),
            ("/flush_cache", self.flush_cache, both),
            *posts("begin_weight_update", "end_weight_update", "update_weights_from_disk",
                   "update_weights_from_tensor", "init_weights_update_group",
                   "update_weights_from_distributed", "destroy_weights_update_group",
                   "update_weight_version"),
            *[(f"/{name}", getattr(self, name), both)
              for name in ("release_memory_occupation", "resume_memory_occupation")],
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

        routes = self.routes()
        gate = Middleware(RequestGate, routes=routes, api_key=self.options.api_key,
                          admin_api_key=self.options.admin_api_key,
                          max_body_bytes=self.options.max_body_bytes,
                          max_admin_body_bytes=self.options.max_admin_body_bytes)
        return Starlette(routes=routes, lifespan=lifespan, middleware=[gate],
                         exception_handlers={BadRequest: lambda r, e: error_response(str(e))})
