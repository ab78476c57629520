"""The gate in front of every route, shown on a route it has never heard of (what a new route
such as H6's OpenAI endpoint gets for free): non-JSON bodies (the browser's text/plain path),
requests from web pages, oversized bodies and malformed JSON are refused before the route
runs; a JSON object passes."""

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import JSONResponse
from starlette.routing import Route

from repo_megatron.engines.sglang_server.auth import AuthLevel, auth_level
from repo_megatron.engines.sglang_server.gate import BadRequest, RequestGate, error_response, json_object, typed

from ..sglang.servers import free_ports, serve_in_thread

LIMIT, ADMIN_LIMIT = 1000, 5000
seen: list = []


async def echo(request):
    body = await json_object(request)
    seen.append(body)
    return JSONResponse({"n": typed(body, "n", int, 0)})


@auth_level(AuthLevel.ADMIN_OPTIONAL)
async def admin_echo(request):
    return await echo(request)


@pytest.fixture(scope="module")
def url():
    routes = [Route("/v1/new_route", echo, methods=["POST"]),
              Route("/admin_route", admin_echo, methods=["POST"])]
    app = Starlette(routes=routes, exception_handlers={
        BadRequest: lambda r, e: error_response(str(e))},
        middleware=[Middleware(RequestGate, routes=routes, max_body_bytes=LIMIT,
                               max_admin_body_bytes=ADMIN_LIMIT)])
    with serve_in_thread(app, free_ports(1)) as address:
        yield address


def refused(response, status, text):
    assert response.status_code == status, response.text
    assert text in response.json()["error"]["message"]


def test_a_json_object_reaches_the_route(url):
    seen.clear()
    answer = httpx.post(url + "/v1/new_route", json={"n": 3})
    assert answer.status_code == 200 and answer.json() == {"n": 3} and seen == [{"n": 3}]
    answer = httpx.post(url + "/v1/new_route", content=b'{"n": 4}',
                        headers={"content-type": "Application/JSON; charset=utf-8"})
    assert answer.json() == {"n": 4}


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", None])
def test_bodies_that_are_not_declared_json_never_reach_the_route(url, content_type):
    seen.clear()
    headers = {"content-type": content_type} if content_type else {}
    answer = httpx.post(url + "/v1/new_route", content=b'{"n": 1}', headers=headers)
    refused(answer, 400, "Only 'application/json' is allowed")
    assert seen == []


def test_requests_from_web_pages_are_refused(url):
    seen.clear()
    answer = httpx.post(url + "/v1/new_route", json={"n": 1},
                        headers={"origin": "http://evil.example"})
    refused(answer, 403, "Origin")
    assert seen == []


def test_bodies_over_the_limit_are_413_declared_or_streamed(url):
    seen.clear()
    big = b'{"n": 1, "pad": "' + b"x" * LIMIT + b'"}'
    refused(httpx.post(url + "/v1/new_route", content=big,
                       headers={"content-type": "application/json"}), 413, str(LIMIT))

    def chunks():                       # no Content-Length: counted while it arrives
        yield big[:600]
        yield big[600:]
    refused(httpx.post(url + "/v1/new_route", content=chunks(),
                       headers={"content-type": "application/json"}), 413, str(LIMIT))
    assert seen == []
    # management routes have their own (larger) limit
    assert httpx.post(url + "/admin_route", content=big,
                      headers={"content-type": "application/json"}).status_code == 200


@pytest.mark.parametrize("body", [b"[1, 2]", b'"text"', b"3", b"{bad json", b"\xff\xfe{}",
                                  b"[" * 2400 + b"]" * 2400, b'{"n": 1' + b"0" * 4500 + b"}"])
def test_bodies_that_are_not_a_json_object_are_400(url, body):
    headers = {"content-type": "application/json"}
    answer = httpx.post(url + "/admin_route", content=body, headers=headers)
    assert answer.status_code == 400, answer.text
    assert "message" in answer.json()["error"]


def test_a_field_of_the_wrong_type_is_named(url):
    refused(httpx.post(url + "/v1/new_route", json={"n": "3"}), 400, "n: expected int")
    refused(httpx.post(url + "/v1/new_route", json={"n": True}), 400, "n: expected int")
