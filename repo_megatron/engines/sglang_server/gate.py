"""What every request passes before a route sees it, and the JSON-body helper routes share.

:class:`RequestGate` is ASGI middleware over the whole app, so a new route gets it without
asking. In order, it refuses:

1. a missing or wrong API key for the route's :class:`~.auth.AuthLevel` (401/403, as SGLang);
2. any request carrying an ``Origin`` header (403): browsers add it to cross-site and
   DNS-rebound requests, and no client of this API is a web page;
3. a body over the limit (413): ``max_body_bytes``, or ``max_admin_body_bytes`` on admin
   routes (tensor updates are large), checked on ``Content-Length`` and while reading;
4. a non-empty body whose ``Content-Type`` is not ``application/json`` (400, SGLang's
   message): a web page can send ``text/plain`` without a CORS preflight.

Routes read their body with :func:`json_object` and raise :class:`BadRequest` for any field
they refuse; the app answers it 400 ``{"error": {"message": ...}}`` (SGLang's shape).
"""

from __future__ import annotations

import json
import reprlib
from typing import Any, Optional

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Match

from .auth import AuthLevel, decide

UNSUPPORTED_MEDIA_TYPE = "Unsupported Media Type: Only 'application/json' is allowed"


class BadRequest(ValueError):
    """A request this server refuses: answered 400 with ``{"error": {"message"}}``."""


_BRIEF = reprlib.Repr()
_BRIEF.maxlevel, _BRIEF.maxstring, _BRIEF.maxother = 3, 80, 80


def brief(value: Any) -> str:
    """A short repr of a client's value for an error message (bounded for any depth/size)."""
    return _BRIEF.repr(value)


def error_response(message: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": {"message": message}}, status_code=status)


async def json_object(request: Request) -> dict[str, Any]:
    """The request's JSON body, which must be an object (``{}`` when the body is empty)."""
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError) as e:     # bad JSON or UTF-8, too deep, huge ints
        raise BadRequest(f"the body is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(value, dict):
        raise BadRequest(f"the body must be a JSON object, not {type(value).__name__}")
    return value


def typed(body: dict, key: str, kind: type, default: Any = None) -> Any:
    """``body[key]`` if it is a ``kind`` (bool is not an int here), ``default`` when the key
    is missing or null; anything else is a :class:`BadRequest` naming the field."""
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind in (int, float) and isinstance(value, bool)):
        raise BadRequest(f"{key}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def route_level(routes: list, scope: dict) -> AuthLevel:
    """The auth level of the route that will serve ``scope`` (``NORMAL`` if none matches)."""
    for route in routes:
        match, child = route.matches(scope)
        if match == Match.FULL:
            endpoint = child.get("endpoint") or getattr(route, "endpoint", None)
            return getattr(endpoint, "_auth_level", AuthLevel.NORMAL)
    return AuthLevel.NORMAL


class RequestGate:
    """ASGI middleware: auth, origin, body size and content type (module docstring)."""

    def __init__(self, app, *, routes: list, api_key: Optional[str] = None,
                 admin_api_key: Optional[str] = None, max_body_bytes: int = 16 << 20,
                 max_admin_body_bytes: int = 4 << 30):
        self.app, self.routes = app, routes
        self.api_key, self.admin_api_key = api_key, admin_api_key
        self.max_body_bytes, self.max_admin_body_bytes = max_body_bytes, max_admin_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        level = route_level(self.routes, scope)
        status = decide(request.method, request.url.path, request.headers.get("authorization"),
                        self.api_key, self.admin_api_key, level)
        if status is not None:
            message = "Unauthorized" if status == 401 else "Forbidden"
            await JSONResponse({"error": message}, status_code=status)(scope, receive, send)
            return
        if "origin" in request.headers:
            await error_response("requests from web pages (with an Origin header) are refused",
                                 403)(scope, receive, send)
            return
        if request.method in ("POST", "PUT", "PATCH", "DELETE"):
            limit = self.max_body_bytes if level == AuthLevel.NORMAL else self.max_admin_body_bytes
            body = await self.read_body(request, receive, limit)
            if body is None:
                await error_response(f"the request body exceeds the server's limit of {limit} "
                                     f"bytes", 413)(scope, receive, send)
                return
            media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if body.strip() and media_type != "application/json":
                await error_response(UNSUPPORTED_MEDIA_TYPE)(scope, receive, send)
                return
            receive = replay(body, receive)
        await self.app(scope, receive, send)

    @staticmethod
    async def read_body(request: Request, receive, limit: int) -> Optional[bytes]:
        """The whole body, or None once it exceeds ``limit`` bytes (declared or sent)."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and (len(declared) > 18 or int(declared) > limit):
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":         # the client went away
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def replay(body: bytes, receive):
    """A ``receive`` that hands the app the already-read body, then the client's events."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return replayed
