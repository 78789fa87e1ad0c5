"""Hostile and unlucky clients: retries that would re-run a MoA, slow and idle connections,
too many connections, undecodable keys, malformed HTTP, and answers written with no proposer."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Iterator

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web
from support.http import AppServer
from support.requests import CHAT, body
from support.server import (
    config,
    host_port,
    raw_request,
    read_until_closed,
    serving,
    serving_like_cli,
    split_response,
    stream,
)

from moa_stream.config import loads_config
from moa_stream.server.logs import configure_logging

KEY = "sk-hardening-7d1e2f"


# -- x-should-retry --------------------------------------------------------------------------


async def test_sdk_does_not_rerun_a_moa_whose_aggregator_failed() -> None:
    """A 502 says ``x-should-retry: false``, so the SDK's two default retries (which would run
    every proposer and the aggregator again) are not made."""
    async with serving() as srv:
        client = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=2)
        async with client:
            with pytest.raises(openai.InternalServerError) as failed:
                await client.chat.completions.create(
                    model="agg-broken", messages=[{"role": "user", "content": "hi"}]
                )
        assert failed.value.status_code == 502
        assert failed.value.response.headers["x-should-retry"] == "false"
        assert srv.state.metrics.requests.value("agg-broken", "upstream_error") == 1


async def test_busy_and_draining_say_a_retry_may_work(session: aiohttp.ClientSession) -> None:
    async with serving(config(max_concurrent_streams=1)) as srv:
        first = asyncio.ensure_future(stream(session, srv.url, body("crawl-aggregator")))
        for _ in range(3000):  # until the first request runs (30 s at most)
            if srv.state.active:
                break
            await asyncio.sleep(0.01)
        async with session.post(srv.url + CHAT, json=body()) as resp:
            assert resp.status == 429
            assert resp.headers["x-should-retry"] == "true"
            assert resp.headers["retry-after-ms"] == "1000"
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        async with session.post(srv.url + CHAT, json=body("nope")) as resp:
            assert resp.status == 404
            assert resp.headers["x-should-retry"] == "false"


# -- connections -------------------------------------------------------------------------------

SHORT = {"header_timeout": 0.3, "body_timeout": 0.3, "keepalive_timeout": 0.5}


async def test_a_connection_that_sends_nothing_is_closed() -> None:
    async with serving_like_cli(config(**SHORT)) as url:
        reader, writer = await asyncio.open_connection(*host_port(url))
        try:
            raw = await read_until_closed(reader, within=10)
        finally:
            writer.close()
    status, _, payload = split_response(raw)
    assert status == 408
    assert orjson.loads(payload)["error"]["code"] == "request_header_timeout"


async def test_headers_dripping_in_are_cut_off_at_the_header_timeout() -> None:
    async with serving_like_cli(config(**SHORT)) as url:
        reader, writer = await asyncio.open_connection(*host_port(url))
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\n")
            with pytest.raises(ConnectionError):  # noqa: PT012 - the loop is what is cut off
                for i in range(200):
                    # One header line every 50 ms: each byte resets no timer.
                    writer.write(f"X-Drip-{i}: 1\r\n".encode())
                    await writer.drain()
                    await asyncio.sleep(0.05)
                    if reader.at_eof():
                        raise ConnectionResetError
        finally:
            writer.close()
        assert loop.time() - started < 8


async def test_a_body_that_stops_arriving_gets_408() -> None:
    async with serving_like_cli(config(**SHORT)) as url:
        head = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: 500\r\n\r\n"
        )
        raw = await raw_request(url, head + b'{"model": "fast", ', within=10)
    status, headers, payload = split_response(raw)
    assert status == 408
    assert headers["connection"] == "close"
    assert orjson.loads(payload)["error"]["code"] == "request_body_timeout"


async def test_an_idle_keep_alive_connection_is_closed() -> None:
    async with serving_like_cli(config(**SHORT)) as url:
        reader, writer = await asyncio.open_connection(*host_port(url))
        try:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            raw = await read_until_closed(reader, within=10)
        finally:
            writer.close()
    assert raw.startswith(b"HTTP/1.1 200"), "answered, then closed once idle"


async def test_connections_over_the_cap_get_503_and_the_rest_are_served() -> None:
    async with serving_like_cli(config(max_connections=2)) as url:
        held = [await asyncio.open_connection(*host_port(url)) for _ in range(2)]
        try:
            raw = await raw_request(url, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            status, headers, payload = split_response(raw)
            assert status == 503
            assert headers["x-should-retry"] == "true"
            assert orjson.loads(payload)["error"]["code"] == "too_many_connections"
            # The connections within the cap work.
            reader, writer = held[0]
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert (await read_until_closed(reader, within=10)).startswith(b"HTTP/1.1 200")
        finally:
            for _, writer in held:
                writer.close()


# -- authentication ------------------------------------------------------------------------------


async def test_an_authorization_header_that_is_not_utf8_is_401() -> None:
    async with serving_like_cli(config(api_keys=(KEY,))) as url:
        raw = await raw_request(
            url,
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Authorization: Bearer \xff\xfe\xfd\r\n\r\n",
        )
    status, _, payload = split_response(raw)
    assert status == 401
    assert orjson.loads(payload)["error"]["code"] == "invalid_api_key"


# -- malformed HTTP --------------------------------------------------------------------------------


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    out = io.StringIO()
    configure_logging(level="info", stream=out)
    try:
        yield out
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in handlers:
            root.addHandler(h)
        root.setLevel(level)
        logging.getLogger("aiohttp.access").disabled = False


SECRET_IN_HEADER = b"sk-client-own-key-123456"


@pytest.mark.parametrize(
    ("request_bytes", "code"),
    [
        (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n"
            b"Authorization: Bearer " + SECRET_IN_HEADER + b"\r\n\r\n",
            None,
        ),
        (
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",
            "header_too_large",
        ),
        (
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + SECRET_IN_HEADER
            + b"\x00\r\n\r\n",
            None,
        ),
        (b"G(T /v1/models HTTP/1.1\r\nHost: x\r\n\r\n", "unknown_method"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40, None),
    ],
    ids=["bad-content-length", "oversized-header", "nul-in-header", "bad-method", "tls-bytes"],
)
async def test_http_parser_errors_get_json_and_one_warning_line(
    log_lines: io.StringIO, request_bytes: bytes, code: str | None
) -> None:
    async with serving_like_cli(config()) as url:
        raw = await raw_request(url, request_bytes)
    status, headers, payload = split_response(raw)
    assert 400 <= status < 500
    assert headers["content-type"].startswith("application/json")
    error = orjson.loads(payload)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if code is not None:
        assert error["code"] == code
    lines = [orjson.loads(line) for line in log_lines.getvalue().splitlines()]
    bad = [line for line in lines if line["event"] == "http.bad_request"]
    assert len(bad) == 1 and bad[0]["level"] == "warning"
    text = log_lines.getvalue()
    assert SECRET_IN_HEADER.decode() not in text
    assert "Traceback" not in text and "exception" not in text


# -- degraded answers --------------------------------------------------------------------------


async def test_an_answer_without_any_proposer_says_so(session: aiohttp.ClientSession) -> None:
    async with serving() as srv:
        async with session.post(srv.url + CHAT, json=body("no-proposer")) as resp:
            assert resp.status == 200
            assert resp.headers["X-MoA-Degraded"] == "true"
            data = await resp.json()
        # The failed proposer's request got no usage back: its share is an estimate.
        assert data["moa_stream"] == {"degraded": True, "usage_estimated": True}
        assert data["choices"][0]["message"]["content"]

        sse = await stream(session, srv.url, body("no-proposer"))
        assert sse.status == 200
        assert sse.headers["X-MoA-Degraded"] == "true"
        (finish,) = [c for c in sse.chunks if c.get("choices") and c["choices"][0]["finish_reason"]]
        assert finish["moa_stream"] == {"degraded": True}
        assert sse.text

        # A healthy MoA and one with a single failed proposer out of two are not degraded.
        for model in ("fast", "degraded"):
            sse = await stream(session, srv.url, body(model))
            assert "X-MoA-Degraded" not in sse.headers
            assert all("moa_stream" not in c for c in sse.chunks)


# -- upstream keys in error bodies -----------------------------------------------------------

UPSTREAM_KEY = "sk-Hq2Zq8vT1mN4bX7cR2wY5uK9pL3f"


async def test_an_upstream_key_cut_by_the_error_length_limit_does_not_leak(
    session: aiohttp.ClientSession, log_lines: io.StringIO, app_server: AppServer
) -> None:
    """The upstream quotes the key in a plain-text error body, straddling the 500-character
    cut of error messages: neither the 502, the progress stream nor the log may show any long
    piece of it."""

    async def refuse(request: web.Request) -> web.Response:
        text = "x" * 461 + " Incorrect API key provided: " + UPSTREAM_KEY + " (see docs)"
        return web.Response(status=401, text=text)

    upstream = web.Application()
    upstream.router.add_post("/v1/chat/completions", refuse)
    upstream_url = await app_server(upstream, handler_cancellation=False)
    cfg = loads_config(
        f"""
[providers.up]
base_url = "{upstream_url}/v1"
api_key = "{UPSTREAM_KEY}"
retry = {{ max_attempts = 1 }}

[agents.up]
provider = "up"
model = "m"

[moa.up]
preset = "single"
aggregator = "up"
"""
    )
    async with serving(cfg) as srv:
        async with session.post(srv.url + CHAT, json=body("up")) as resp:
            assert resp.status == 502
            message = (await resp.json())["error"]["message"]
        sse = await stream(session, srv.url, body("up", moa_stream={"progress": True}))
    assert "Incorrect API key" in message
    seen = message + "".join(sse.comments) + "".join(sse.data) + log_lines.getvalue()
    for i in range(len(UPSTREAM_KEY) - 8):
        assert UPSTREAM_KEY[i : i + 8] not in seen, UPSTREAM_KEY[i : i + 8]
