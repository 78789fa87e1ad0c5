"""What a client sends comes back bounded, and every error the server writes is JSON.

A 500 KB ``model`` must not be echoed whole in the 404 body nor logged whole; an ``Expect``
header the server cannot meet gets an OpenAI-style 417, not aiohttp's plain text.
"""

from __future__ import annotations

import aiohttp
import orjson
import pytest
from structlog.testing import capture_logs
from support.requests import CHAT, body
from support.server import Running, raw_request, split_response

from moa_stream.server.errors import MAX_ECHO_CHARS, MAX_MESSAGE_CHARS

HUGE = "m" * 500_000


async def test_a_huge_model_is_not_echoed_or_logged_whole(
    srv: Running, session: aiohttp.ClientSession
) -> None:
    with capture_logs() as logs:
        async with session.post(srv.url + CHAT, json=body(HUGE)) as resp:
            assert resp.status == 404
            error = (await resp.json())["error"]
    assert error["code"] == "model_not_found"
    assert len(error["message"]) < MAX_ECHO_CHARS + 500
    assert "500000 characters" in error["message"], "the quote says it was cut"
    line = next(e for e in logs if e["event"] == "request")
    assert len(orjson.dumps(line)) < 4 * MAX_ECHO_CHARS + 1000


async def test_a_huge_path_is_not_echoed_or_logged_whole(
    srv: Running, session: aiohttp.ClientSession
) -> None:
    path = "/v1/models/" + "x" * 6000  # under aiohttp's own line limit (8190)
    with capture_logs() as logs:
        async with session.get(srv.url + path) as resp:
            assert resp.status == 404
            message = (await resp.json())["error"]["message"]
    assert len(message) < MAX_ECHO_CHARS + 500
    line = next(e for e in logs if e["event"] == "request")
    assert len(line["path"]) < MAX_ECHO_CHARS + 100


async def test_error_messages_are_bounded_whatever_they_quote(
    srv: Running, session: aiohttp.ClientSession
) -> None:
    """The wire module quotes a wrong role as it came; the message is bounded all the same."""
    payload = {"model": "fast", "messages": [{"role": "r" * 100_000, "content": "hi"}]}
    async with session.post(srv.url + CHAT, json=payload) as resp:
        assert resp.status == 400
        message = (await resp.json())["error"]["message"]
    assert len(message) <= MAX_MESSAGE_CHARS + 50


@pytest.mark.parametrize("path", [CHAT, "/v1/models", "/healthz", "/no/such/path"])
async def test_an_unmet_expect_is_a_json_417(srv: Running, path: str) -> None:
    method = "POST" if path == CHAT else "GET"
    data = orjson.dumps(body())
    raw = await raw_request(
        srv.url,
        (
            f"{method} {path} HTTP/1.1\r\nHost: x\r\nExpect: 200-ok\r\nConnection: close\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
        ).encode()
        + data,
    )
    status, headers, rest = split_response(raw)
    assert status == 417
    assert headers["content-type"].startswith("application/json")
    payload = orjson.loads(rest[rest.index(b"{") : rest.rindex(b"}") + 1])
    assert payload["error"]["code"] == "expectation_failed"
    assert "200-ok" in payload["error"]["message"]
    assert headers["x-should-retry"] == "false"


async def test_expect_100_continue_still_works(
    srv: Running, session: aiohttp.ClientSession
) -> None:
    async with session.post(srv.url + CHAT, json=body(), expect100=True) as resp:
        assert resp.status == 200
        assert (await resp.json())["choices"][0]["message"]["content"]


async def test_an_unmet_expect_on_the_chat_route_is_logged_and_counted(srv: Running) -> None:
    data = orjson.dumps(body())
    with capture_logs() as logs:
        await raw_request(
            srv.url,
            (
                f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nExpect: 200-ok\r\nConnection: close\r\n"
                f"Content-Length: {len(data)}\r\n\r\n"
            ).encode()
            + data,
        )
    line = next(e for e in logs if e["event"] == "request")
    assert line["status"] == 417
    assert line["error_code"] == "expectation_failed"
