"""Scripted judge servers for the judge tests: an OpenAI-compatible /v1/chat/completions and
SGLang's /generate whose answers (a verdict, an error status, a hang, a malformed body) follow
a script of the request, and which record what they were sent."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Callable, Iterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from tests.sglang.servers import free_ports, serve_in_thread

# script(prompt text, call number) -> "text:<answer>" | int status | "hang" | "malformed"
Script = Callable[[str, int], object]


def by_response(prompt: str, call: int) -> object:
    """Judge the response the prompt quotes: "right" -> yes, "wrong" -> no, else a cue."""
    response = prompt.split("Response to grade:\n", 1)[-1].split("\n\n", 1)[0]
    cues = {"right": "text:The answer matches.\nVerdict: yes",
            "wrong": "text:It does not match.\nVerdict: no",
            "mumble": "text:I am not sure what to say.", "hang": "hang", "malformed": "malformed"}
    if response.startswith("status "):
        return int(response.split()[1])
    return cues.get(response, "text:Verdict: no")


class FakeJudge:
    """Both endpoints over one script; ``bodies`` and ``headers`` record every request."""

    def __init__(self, script: Script = by_response):
        self.script, self.calls = script, 0
        self.bodies: list[dict] = []
        self.headers: list[dict] = []

    async def act(self, request: Request, prompt: str):
        self.calls += 1
        self.headers.append(dict(request.headers))
        action = self.script(prompt, self.calls)
        if action == "hang":
            await asyncio.sleep(3600)
        if isinstance(action, int):
            return JSONResponse({"object": "error", "message": f"scripted {action}",
                                 "type": "Error", "param": None, "code": action},
                                status_code=action)
        if action == "malformed":
            return PlainTextResponse("<html>not json</html>")
        return action.removeprefix("text:")

    async def chat(self, request: Request) -> Response:
        body = await request.json()
        self.bodies.append(body)
        answer = await self.act(request, body["messages"][-1]["content"])
        if isinstance(answer, Response):
            return answer
        return JSONResponse({
            "id": f"chatcmpl-{self.calls}", "object": "chat.completion", "created": 0,
            "model": body.get("model", "default"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                         "finish_reason": "stop", "matched_stop": 2, "logprobs": None}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}})

    async def generate(self, request: Request) -> Response:
        body = await request.json()
        self.bodies.append(body)
        answer = await self.act(request, body.get("text") or "")
        if isinstance(answer, Response):
            return answer
        return JSONResponse({"text": answer, "output_ids": [1, 2],
                             "meta_info": {"id": "x", "finish_reason": {"type": "stop"}}})

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/v1/chat/completions", self.chat, methods=["POST"]),
                                 Route("/generate", self.generate, methods=["POST"])])


@contextlib.contextmanager
def running(*judges: FakeJudge) -> Iterator[list[str]]:
    """Serve each judge on its own loopback port; yields their root URLs."""
    base = free_ports(len(judges))
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(serve_in_thread(j.app(), base + i))
               for i, j in enumerate(judges)]


def refused_url() -> str:
    """A loopback URL nothing listens on."""
    return f"http://127.0.0.1:{free_ports(1)}"
