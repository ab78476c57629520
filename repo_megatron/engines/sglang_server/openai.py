"""``/v1/chat/completions`` of ``repo-megatron serve``: the OpenAI chat API, non-streaming, in
SGLang's shape, so an OpenAI client (an LLM judge, an eval harness) can talk to the CPU engine.

It follows SGLang 0.5.23's ``python/sglang/srt/entrypoints/openai/``: ``protocol.py``
(``ChatCompletionRequest`` fields and defaults: temperature and top_p 1, top_k -1,
``max_completion_tokens`` or else ``max_tokens``, ``seed`` as ``sampling_seed``;
``ChatCompletionResponse``, ``UsageInfo``, ``ErrorResponse``) and ``serving_chat.py`` (the
messages go through the tokenizer's chat template with the generation prompt; the response is
built from the same ``meta_info`` as ``/generate``: ``id``, ``finish_reason`` with
``matched_stop``, token counts, ``metadata.weight_version``).

Not served: streaming, ``n > 1``, tools, logprobs, images (each refused with a 400 that says
so, in SGLang's ``ErrorResponse`` shape).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response

from .gate import BadRequest, brief, json_object
from .generate_request import GenerateItem, parse_generate
from .worker import Request

DEFAULT_MODEL_NAME = "default"          # SGLang's name when a request gives none
ROLES = ("system", "developer", "user", "assistant")


class ChatRequestError(ValueError):
    """A chat request this server cannot serve: answered 400."""


def openai_error(message: str, status: int = 400, kind: str = "BadRequestError") -> JSONResponse:
    """SGLang's ``ErrorResponse`` of the OpenAI endpoints."""
    return JSONResponse({"object": "error", "message": message, "type": kind, "param": None,
                         "code": status}, status_code=status)


def message_text(index: int, message: Any) -> dict:
    """One message as ``{"role", "content"}`` with text content (a list of text parts is
    joined, as the chat template of a text model would need)."""
    if not isinstance(message, dict) or message.get("role") not in ROLES:
        raise ChatRequestError(f"messages[{index}] must be an object with a role in "
                               f"{', '.join(ROLES)}")
    content = message.get("content")
    if isinstance(content, list):
        parts = [p.get("text") if isinstance(p, dict) and p.get("type") == "text" else None
                 for p in content]
        if any(not isinstance(p, str) for p in parts):
            raise ChatRequestError(f"messages[{index}].content: only text parts are supported "
                                   f"by repo-megatron serve")
        content = "\n".join(parts)
    if not isinstance(content, str):
        raise ChatRequestError(f"messages[{index}].content must be a string or text parts")
    return {"role": message["role"], "content": content}


def native_sampling_params(body: dict) -> dict:
    """A ``ChatCompletionRequest``'s sampling fields as SGLang's native ``sampling_params``
    (as ``ChatCompletionRequest.to_sampling_params`` maps them)."""
    def pick(name: str, default: Any) -> Any:
        value = body.get(name)
        return default if value is None else value

    raw = {"temperature": pick("temperature", 1.0), "top_p": pick("top_p", 1.0),
           "top_k": pick("top_k", -1), "stop": body.get("stop"),
           "stop_token_ids": body.get("stop_token_ids"), "sampling_seed": body.get("seed")}
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    if max_tokens is not None:
        raw["max_new_tokens"] = max_tokens
    return raw


class ChatCompletions:
    """The endpoint over one :class:`~.app.SGLangServer` (its worker, tokenizer, versions;
    not imported here: the server imports this module)."""

    def __init__(self, server):
        self.server = server

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        tokenizer = self.server.worker.engine.tokenizer
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False,
                                                 add_generation_prompt=True)
        except Exception as e:  # no template, or the template rejects the conversation
            raise ChatRequestError(f"cannot apply the chat template: {e}") from None
        # the template writes its own BOS
        return list(tokenizer.encode(text, add_special_tokens=False))

    def parse(self, body: Any) -> GenerateItem:
        """The engine request of a ``ChatCompletionRequest`` body: the chat template applied,
        then the checks and limits of a ``/generate`` request (``GenerateReqInput``)."""
        if not isinstance(body, dict):
            raise ChatRequestError("the body must be a JSON object")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ChatRequestError("Messages cannot be empty.")
        for name, ok in (("stream", not body.get("stream")), ("n", body.get("n", 1) in (1, None)),
                         ("tools", not body.get("tools")), ("logprobs", not body.get("logprobs"))):
            if not ok:
                raise ChatRequestError(f"{name}={brief(body.get(name))} is not supported by "
                                       f"repo-megatron serve")
        ids = self.prompt_ids([message_text(i, m) for i, m in enumerate(messages)])
        generate = {"input_ids": ids, "sampling_params": native_sampling_params(body)}
        try:
            _, (item,) = parse_generate(generate, self.server.limits,
                                        self.server.worker.engine.tokenizer.encode,
                                        lambda: f"chatcmpl-{uuid.uuid4().hex}")
        except BadRequest as e:                   # invalid sampling params, limits
            raise ChatRequestError(str(e)) from None
        return item

    async def completions(self, request: HTTPRequest) -> Response:
        """``POST /v1/chat/completions``."""
        if self.server.worker.status != "up":
            return openai_error("the server is starting", 503, "ServiceUnavailableError")
        try:
            body = await json_object(request)
            # the chat template and tokenising take a while: off the event loop
            item = await asyncio.to_thread(self.parse, body)
        except (BadRequest, ChatRequestError) as e:
            return openai_error(str(e))
        engine_request = Request(item.rid, item.input_ids, item.params)  # needs the event loop
        start = time.perf_counter()
        (outcome,) = await self.server.until_disconnected(request, [engine_request])
        if isinstance(outcome, Exception):
            return openai_error(f"generation failed: {type(outcome).__name__}: {outcome}", 500,
                                "InternalServerError")
        answer = self.server.answer(item, outcome, time.perf_counter() - start)
        model = body.get("model") if isinstance(body.get("model"), str) else None
        return JSONResponse(chat_response(answer, model or DEFAULT_MODEL_NAME))


def chat_response(answer: dict, model: str) -> dict:
    """A ``ChatCompletionResponse`` from one ``/generate`` answer (``text``, ``meta_info``),
    as SGLang's ``OpenAIServingChat._build_chat_response`` builds it."""
    meta = answer["meta_info"]
    finish = meta.get("finish_reason") or {}
    prompt_tokens, completion_tokens = meta["prompt_tokens"], meta["completion_tokens"]
    choice = {"index": 0,
              "message": {"role": "assistant", "content": answer["text"] or "",
                          "reasoning_content": None},
              "logprobs": None, "finish_reason": finish.get("type"),
              "matched_stop": finish.get("matched")}
    return {"id": meta["id"], "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": [choice],
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens +
                      completion_tokens, "completion_tokens": completion_tokens,
                      "prompt_tokens_details": None, "reasoning_tokens": 0,
                      "completion_tokens_details": None},
            "metadata": {"weight_version": meta["weight_version"]}}
