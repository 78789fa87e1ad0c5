"""OpenAIProvider over real loopback sockets, against scripted servers: the wire quirks,
status mapping, timeouts, retries, clean-up and timings."""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from support.providers import (
    DONE,
    HELLO,
    RawServer,
    Seen,
    SleepRecorder,
    chunk,
    collect,
    drain,
    error_response,
    provider_for,
    raw_server,
    request,
    serve_bytes,
    sse_response,
    usage_chunk,
)

from moa_stream import (
    AuthenticationError,
    ConfigError,
    ConnectError,
    ConnectTimeout,
    Delta,
    FirstTokenTimeout,
    IdleTimeout,
    ModelNotFoundError,
    ProtocolError,
    Provider,
    ProviderClosedError,
    ProviderError,
    ProviderStream,
    RateLimitError,
    RequestRejectedError,
    ServerError,
    StreamInterruptedError,
    TotalTimeout,
    TruncatedStreamError,
    UpstreamError,
    Usage,
)
from moa_stream.providers import (
    OpenAIProvider,
    OpenAIStream,
    RetryPolicy,
    RetrySettings,
    Timeouts,
)


async def aenumerate(stream: OpenAIStream) -> AsyncIterator[tuple[int, Delta]]:
    i = 0
    async for delta in stream:
        yield i, delta
        i += 1


FAST = Timeouts(connect=0.5, first_token=0.5, idle=0.5, total=10)


async def stall(request: web.Request, seen: Seen) -> web.StreamResponse:
    await asyncio.sleep(30)
    raise AssertionError("unreachable")


# -- the request on the wire -------------------------------------------------------------------


async def test_request_body_and_headers() -> None:
    async with raw_server(serve_bytes(HELLO)) as server:
        provider = provider_for(server, api_key="sk-secret", headers={"X-Title": "moa"})
        async with provider:
            req = request(
                temperature=0.5,
                max_tokens=7,
                stop=("END",),
                extra={"top_p": 0.9, "seed": 3, "stream_options": {"include_usage": False}},
            )
            assert await collect(provider, req) == "Hello world"
    (seen,) = server.seen
    assert seen.body == {
        "model": "m",
        "messages": [{"role": "user", "content": "Say hello."}],
        "stream": True,
        "temperature": 0.5,
        "max_tokens": 7,
        "stop": ["END"],
        "stream_options": {"include_usage": False},  # extra wins, verbatim
        "top_p": 0.9,
        "seed": 3,
    }
    assert seen.headers["Authorization"] == "Bearer sk-secret"
    assert seen.headers["Accept"] == "text/event-stream"
    assert seen.headers["Content-Type"] == "application/json"
    assert seen.headers["X-Title"] == "moa"


async def test_max_completion_tokens_field_and_no_key() -> None:
    async with (
        raw_server(serve_bytes(HELLO)) as server,
        provider_for(server, max_tokens_field="max_completion_tokens") as provider,
    ):
        await collect(provider, request(max_tokens=9))
        async with provider_for(server, stream_options_usage=False) as provider:
            await collect(provider)
    first, second = server.seen
    assert first.body["max_completion_tokens"] == 9
    assert "max_tokens" not in first.body
    assert first.body["stream_options"] == {"include_usage": True}
    assert "Authorization" not in first.headers
    assert "stream_options" not in second.body
    assert "temperature" not in second.body


async def test_api_key_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOA_TEST_KEY", "sk-env")
    async with (
        raw_server(serve_bytes(HELLO)) as server,
        provider_for(server, api_key_env="MOA_TEST_KEY") as provider,
    ):
        monkeypatch.delenv("MOA_TEST_KEY")  # read once, at construction
        await collect(provider)
    assert server.seen[0].headers["Authorization"] == "Bearer sk-env"


def test_configuration_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MOA_TEST_MISSING", raising=False)
    with pytest.raises(ConfigError, match="MOA_TEST_MISSING"):
        OpenAIProvider("http://127.0.0.1:1/v1", api_key_env="MOA_TEST_MISSING")
    with pytest.raises(ConfigError, match="base_url"):
        OpenAIProvider("127.0.0.1:8000/v1")
    with pytest.raises(ConfigError, match="limit"):
        OpenAIProvider("http://127.0.0.1:1/v1", limit=0)
    with pytest.raises(ConfigError, match=r"timeouts\.idle"):
        Timeouts(idle=0)
    with pytest.raises(ConfigError, match="max_attempts"):
        RetrySettings(max_attempts=0)
    with pytest.raises(ConfigError, match="jitter"):
        RetrySettings(jitter=2)


def test_names_repr_and_protocols() -> None:
    provider = OpenAIProvider("http://example.com:8080/v1/", api_key="sk-secret")
    assert provider.name == "example.com:8080"
    assert OpenAIProvider("https://api.example.com/v1").name == "api.example.com"
    assert provider.base_url == "http://example.com:8080/v1"
    assert "sk-secret" not in repr(provider)
    assert isinstance(provider, Provider)
    stream = provider.stream(request())
    assert isinstance(stream, ProviderStream)
    assert stream.usage is None and stream.finish_reason is None
    assert "state=new" in repr(stream)


def test_retry_settings_delays() -> None:
    retry = RetrySettings(backoff_base=0.1, backoff_cap=0.3, jitter=0.5)
    assert retry.delay(1, 0.0) == pytest.approx(0.1)
    assert retry.delay(2, 0.0) == pytest.approx(0.2)
    assert retry.delay(5, 0.0) == pytest.approx(0.3)
    assert retry.delay(1, 0.999) == pytest.approx(0.05, rel=0.01)


def test_retry_policy_is_the_former_name_of_retry_settings() -> None:
    assert RetryPolicy is RetrySettings


# -- wire quirks -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(HELLO.replace(b"\n", b"\r"), id="cr-line-endings"),
        pytest.param(HELLO.replace(b"\n", b"\r\n"), id="crlf-line-endings"),
        pytest.param(HELLO[: -len(DONE)] + b"data: [DONE]", id="done-without-blank-line"),
        pytest.param(HELLO[: -len(DONE)], id="eof-after-finish-without-done"),
        pytest.param(b": OPENROUTER PROCESSING\n\n" + HELLO, id="keepalive-comments"),
        pytest.param(b"\xef\xbb\xbf" + HELLO, id="bom"),
        pytest.param(b"event: message\nid: 1\nretry: 5\n" + HELLO, id="unknown-fields"),
        pytest.param(HELLO + b"data: ignored after done\n\n", id="data-after-done-ignored"),
    ],
)
async def test_wire_quirk(body: bytes) -> None:
    async with (
        raw_server(serve_bytes(body)) as server,
        provider_for(server) as provider,
        provider.stream(request()) as stream,
    ):
        text = "".join([d.content async for d in stream])
        assert text == "Hello world"
        assert stream.finish_reason == "stop"


async def test_every_byte_in_its_own_write() -> None:
    parts = [HELLO[i : i + 1] for i in range(len(HELLO))]
    async with raw_server(serve_bytes(parts)) as server, provider_for(server) as provider:
        assert await collect(provider) == "Hello world"


async def test_event_larger_than_aiohttp_readline_limit() -> None:
    big = "x" * 200_000
    body = chunk(big) + chunk(finish="stop") + DONE
    async with raw_server(serve_bytes(body)) as server, provider_for(server) as provider:
        assert await collect(provider) == big


async def test_role_only_and_empty_chunks_are_not_yielded() -> None:
    body = (
        chunk("", role="assistant")
        + chunk(None)
        + chunk("a")
        + chunk("")
        + chunk(reasoning_content="think")
        + chunk(finish="length")
        + DONE
    )
    async with (
        raw_server(serve_bytes(body)) as server,
        provider_for(server) as provider,
        provider.stream(request()) as stream,
    ):
        deltas = [d async for d in stream]
    assert deltas == [Delta("a"), Delta(reasoning="think"), Delta(finish_reason="length")]
    assert stream.finish_reason == "length"
    assert stream.timings.chunk_times and len(stream.timings.chunk_times) == 3


async def test_server_usage_is_kept() -> None:
    async with (
        raw_server(serve_bytes(HELLO)) as server,
        provider_for(server) as provider,
        provider.stream(request()) as stream,
    ):
        deltas = [d async for d in stream]
    assert deltas[-1] == Delta(usage=Usage(5, 2))
    assert stream.usage == Usage(5, 2)


async def test_usage_is_estimated_without_server_usage() -> None:
    body = chunk("a") + chunk("b") + chunk("c", finish="stop") + DONE
    async with (
        raw_server(serve_bytes(body)) as server,
        provider_for(server) as provider,
        provider.stream(request("x" * 40)) as stream,
    ):
        async for _ in stream:
            pass
    # 40 characters are 10 tokens; the chat template adds 4 per message and 3 for the reply,
    # and a template's default system message (16 + 4) is counted when there is none. The
    # answer's three characters, in three chunks, are one token: characters count, not chunks.
    assert stream.usage == Usage(prompt_tokens=37, completion_tokens=1, estimated=True)


async def test_non_streamed_json_answer_becomes_one_delta() -> None:
    async def handler(request: web.Request, seen: Seen) -> web.StreamResponse:
        return web.json_response(
            {
                "choices": [{"index": 0, "message": {"content": "whole"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1},
            }
        )

    async with (
        raw_server(handler) as server,
        provider_for(server) as provider,
        provider.stream(request()) as stream,
    ):
        deltas = [d async for d in stream]
    assert deltas == [Delta("whole", finish_reason="stop", usage=Usage(1, 1))]


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "error", "message", "code"),
    [
        pytest.param(
            401,
            {"error": {"message": "Invalid key", "type": "auth_error", "code": "invalid_api_key"}},
            AuthenticationError,
            "Invalid key",
            "invalid_api_key",
            id="401-nested",
        ),
        pytest.param(403, {"error": "forbidden"}, AuthenticationError, "forbidden", None, id="403"),
        pytest.param(
            404,
            {"object": "error", "message": "model m not found", "code": 404},
            ModelNotFoundError,
            "model m not found",
            "404",
            id="404-flat",
        ),
        pytest.param(
            400,
            {"object": "error", "message": "too long", "type": "BadRequestError", "code": 400},
            RequestRejectedError,
            "too long",
            "400",
            id="400-flat",
        ),
        pytest.param(
            422, b"Unprocessable", RequestRejectedError, "Unprocessable", None, id="422-text"
        ),
    ],
)
async def test_status_errors_are_mapped_and_not_retried(
    status: int,
    body: bytes | dict[str, object],
    error: type[ProviderError],
    message: str,
    code: str | None,
) -> None:
    async def handler(request: web.Request, seen: Seen) -> web.StreamResponse:
        return error_response(status, body)

    async with raw_server(handler) as server, provider_for(server) as provider:
        with pytest.raises(error) as info:
            await collect(provider)
    exc = info.value
    assert message in exc.message
    assert exc.code == code
    assert exc.status == status
    assert exc.provider == "test"
    assert exc.model == "m"
    assert exc.request_id == "req-err"
    assert exc.delivered is False
    assert len(server.seen) == 1
    assert f"status={status}" in str(exc)


async def test_api_key_never_appears_in_errors() -> None:
    async def handler(request: web.Request, seen: Seen) -> web.StreamResponse:
        return error_response(401, {"error": {"message": "Incorrect API key: sk-secret-123"}})

    async with (
        raw_server(handler) as server,
        provider_for(server, api_key="sk-secret-123") as provider,
    ):
        with pytest.raises(AuthenticationError) as info:
            await collect(provider)
    assert "sk-secret-123" not in str(info.value)
    assert "sk-secret-123" not in repr(info.value.args)


async def test_error_frame_after_200() -> None:
    body = (
        chunk("", role="assistant")
        + chunk("Hel")
        + b'data: {"error": {"message": "overloaded", "code": 503}}\n\n'
        + DONE
    )
    async with (
        raw_server(serve_bytes(body)) as server,
        provider_for(server) as provider,
        provider.stream(request()) as stream,
    ):
        got: list[str] = []
        with pytest.raises(UpstreamError) as info:
            await drain(stream, got)
    assert got == ["Hel"]
    assert info.value.message == "overloaded"
    assert info.value.code == "503"
    assert info.value.status == 200
    assert info.value.delivered is True


async def test_error_frame_before_content_is_not_retried() -> None:
    body = b'data: {"object": "error", "message": "bad", "code": 400}\n\n'
    async with raw_server(serve_bytes(body)) as server, provider_for(server) as provider:
        with pytest.raises(UpstreamError) as info:
            await collect(provider)
    assert info.value.delivered is False
    assert len(server.seen) == 1


async def test_llama_cpp_error_field() -> None:
    body = chunk("a") + b'error: {"code": 500, "message": "slot unavailable", "type": "server"}\n\n'
    async with raw_server(serve_bytes(body)) as server, provider_for(server) as provider:
        with pytest.raises(UpstreamError, match="slot unavailable"):
            await collect(provider)


async def test_invalid_json_mid_stream() -> None:
    body = chunk("a") + b"data: {oops\n\n" + chunk(finish="stop") + DONE
    async with raw_server(serve_bytes(body)) as server, provider_for(server) as provider:
        with pytest.raises(ProtocolError) as info:
            await collect(provider)
    assert info.value.delivered is True


async def test_eof_before_finish_after_content_is_truncation() -> None:
    body = chunk("", role="assistant") + chunk("a")
    async with raw_server(serve_bytes(body)) as server, provider_for(server) as provider:
        with pytest.raises(TruncatedStreamError) as info:
            await collect(provider)
    assert info.value.delivered is True
    assert len(server.seen) == 1


async def test_eof_before_any_content_is_retried() -> None:
    async def handler(request: web.Request, seen: Seen) -> web.StreamResponse:
        if seen.index == 0:
            return await sse_response(request, chunk("", role="assistant"))
        return await sse_response(request, HELLO)

    async with (
        raw_server(handler) as server,
        provider_for(server) as provider,
        provider.stream(request()) as stream,
    ):
        text = "".join([d.content async for d in stream])
    assert text == "Hello world"
    assert stream.timings.attempts == 2


async def test_reset_mid_stream_after_content() -> None:
    async def handler(request: web.Request, seen: Seen) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(chunk("", role="assistant") + chunk("a"))
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.abort()
        return resp

    async with (
        raw_server(handler) as server,
        provider_for(server) as provider,
        provider.stream(request()) as stream,
    ):
        got: list[str] = []
        with pytest.raises(StreamInterruptedError) as info:
            await drain(stream, got)
    assert got == ["a"]
    assert info.value.delivered is True
    assert len(server.seen) == 1
    assert info.value.__cause__ is not None  # chained to the transport error


async def test_reset_before_any_content_is_retried() -> None:
    async def handler(request: web.Request, seen: Seen) -> web.StreamResponse:
        if seen.index == 0:
            assert request.transport is not None
            request.transport.abort()
            return web.Response()
        return await sse_response(request, HELLO)

    async with (
        raw_server(handler) as server,
        provider_for(server) as provider,
        provider.stream(request()) as stream,
    ):
        text = "".join([d.content async for d in stream])
    assert text == "Hello world"
    assert stream.timings.attempts == 2


async def test_connection_refused() -> None:
    server = RawServer(serve_bytes(HELLO))
    await server.start()
    base_url = server.base_url
    await server.aclose()
    sleep = SleepRecorder()
    async with provider_for(base_url, sleep=sleep) as provider:
        with pytest.raises(ConnectError) as info:
            await collect(provider)
    assert info.value.delivered is False
    assert len(sleep.delays) == 2  # three attempts
    assert isinstance(info.value.__cause__, OSError)


# -- retries -----------------------------------------------------------------------------------


async def test_rate_limit_with_retry_after_then_success() -> None:
    async def handler(request: web.Request, seen: Seen) -> web.StreamResponse:
        if seen.index == 0:
            return error_response(429, {"error": {"message": "slow down"}}, {"Retry-After": "2"})
        return await sse_response(request, HELLO)

    sleep = SleepRecorder()
    async with (
        raw_server(handler) as server,
        provider_for(server, sleep=sleep) as provider,
        provider.stream(request()) as stream,
    ):
        text = "".join([d.content async for d in stream])
    assert text == "Hello world"
    assert sleep.delays == [2.0]
    assert stream.timings.attempts == 2
    assert len(server.peers) == 1  # the error body was read: the connection was reused


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param({"retry-after-ms": "250", "Retry-After": "1"}, 0.25, id="ms-wins"),
        pytest.param({"Retry-After": "1.5"}, 1.5, id="seconds"),
        pytest.param({"Retry-After": "soon"}, 0.2, id="garbage-falls-back-to-backoff"),
    ],
)
async def test_retry_after_forms(headers: dict[str, str], expected: float) -> None:
    async def handler(request: web.Request, seen: Seen) -> web.StreamResponse:
        if seen.index == 0:
            return error_response(503, {"error": {"message": "busy"}}, headers)
        return await sse_response(request, HELLO)

    sleep = SleepRecorder()
    async with raw_server(handler) as server, provider_for(server, sleep=sleep) as provider:
        await collect(provider)
    assert sleep.delays == [pytest.approx(expected)]


async def test_retry_after_http_date() -> None:
    when = email.utils.formatdate(time.time() + 3, usegmt=True)

    async def handler(request: web.Request, seen: Seen) -> web.StreamResponse:
        if seen.index == 0:
            return error_response(429, {"error": {"message": "x"}}, {"Retry-After": when})
        return await sse_response(request, HELLO)

    sleep = SleepRecorder()
    async with raw_server(handler) as server, provider_for(server, sleep=sleep) as provider:
        await collect(provider)
    (delay,) = sleep.delays
    assert 1.0 < delay <= 3.0


async def test_retry_after_beyond_the_cap_is_not_waited_for() -> None:
    async def handler(request: web.Request, seen: Seen) -> web.StreamResponse:
        return error_response(429, {"error": {"message": "x"}}, {"Retry-After": "120"})

    sleep = SleepRecorder()
    async with raw_server(handler) as server, provider_for(server, sleep=sleep) as provider:
        with pytest.raises(RateLimitError) as info:
            await collect(provider)
    assert info.value.retry_after == 120.0
    assert sleep.delays == []
    assert len(server.seen) == 1


async def test_server_errors_exhaust_the_attempts() -> None:
    async def handler(request: web.Request, seen: Seen) -> web.StreamResponse:
        return error_response(500, b"Internal Server Error")

    sleep = SleepRecorder()
    retry = RetrySettings(max_attempts=4, backoff_base=0.1, backoff_cap=0.25, jitter=0.0)
    async with (
        raw_server(handler) as server,
        provider_for(server, sleep=sleep, retry=retry) as provider,
    ):
        stream = provider.stream(request())
        with pytest.raises(ServerError) as info:
            async with stream:
                pass
    assert info.value.message == "HTTP 500: Internal Server Error"
    assert len(server.seen) == 4
    assert sleep.delays == pytest.approx([0.1, 0.2, 0.25])
    assert stream.timings.attempts == 4


async def test_retries_respect_the_total_timeout() -> None:
    async def handler(request: web.Request, seen: Seen) -> web.StreamResponse:
        return error_response(503, {"error": {"message": "x"}}, {"Retry-After": "5"})

    sleep = SleepRecorder()
    timeouts = Timeouts(connect=1, first_token=1, idle=1, total=3)
    async with (
        raw_server(handler) as server,
        provider_for(server, sleep=sleep, timeouts=timeouts) as provider,
    ):
        with pytest.raises(ServerError):
            await collect(provider)
    assert sleep.delays == []  # waiting 5 s would overrun the 3 s total


async def test_first_token_timeout_is_retried_then_succeeds() -> None:
    async def handler(request: web.Request, seen: Seen) -> web.StreamResponse:
        if seen.index == 0:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(chunk("", role="assistant"))
            await asyncio.sleep(30)
        return await sse_response(request, HELLO)

    async with (
        raw_server(handler) as server,
        provider_for(server, timeouts=FAST) as provider,
        provider.stream(request()) as stream,
    ):
        text = "".join([d.content async for d in stream])
        await asyncio.wait_for(server.seen[0].finished.wait(), 5)
    assert text == "Hello world"
    assert stream.timings.attempts == 2
    assert server.seen[0].disconnected  # the stalled attempt's connection was closed


async def test_no_retry_after_the_first_token() -> None:
    async def handler(request: web.Request, seen: Seen) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(chunk("a"))
        await asyncio.sleep(30)
        return resp

    async with (
        raw_server(handler) as server,
        provider_for(server, timeouts=FAST) as provider,
        provider.stream(request()) as stream,
    ):
        got: list[str] = []
        with pytest.raises(IdleTimeout) as info:
            await drain(stream, got)
    assert got == ["a"]
    assert info.value.delivered is True
    assert info.value.timeout == 0.5
    assert len(server.seen) == 1


# -- timeouts ----------------------------------------------------------------------------------


async def test_connect_timeout_when_headers_never_come() -> None:
    retry = RetrySettings(max_attempts=1)
    async with (
        raw_server(stall) as server,
        provider_for(server, timeouts=FAST, retry=retry) as provider,
    ):
        started = time.monotonic()
        with pytest.raises(ConnectTimeout) as info:
            await collect(provider)
        elapsed = time.monotonic() - started
    assert info.value.timeout == 0.5
    assert 0.4 < elapsed < 5


async def test_first_token_timeout_ignores_keepalives_and_role_chunks() -> None:
    async def handler(request: web.Request, seen: Seen) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(chunk("", role="assistant"))
        for _ in range(100):
            await resp.write(b": keep-alive\n\n")
            await asyncio.sleep(0.1)
        return resp

    timeouts = Timeouts(connect=1, first_token=0.6, idle=0.3, total=10)
    async with (
        raw_server(handler) as server,
        provider_for(server, timeouts=timeouts, retry=RetrySettings(1)) as provider,
    ):
        with pytest.raises(FirstTokenTimeout) as info:
            await collect(provider)
    assert info.value.timeout == 0.6
    assert info.value.delivered is False


async def test_first_token_timeout_starts_when_the_request_is_sent() -> None:
    async def handler(request: web.Request, seen: Seen) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await asyncio.sleep(30)
        return resp

    timeouts = Timeouts(connect=5, first_token=0.3, idle=5, total=10)
    async with (
        raw_server(handler) as server,
        provider_for(server, timeouts=timeouts, retry=RetrySettings(1)) as provider,
    ):
        stream = provider.stream(request())
        with pytest.raises(FirstTokenTimeout):
            await drain(stream, [])
    timings = stream.timings
    assert timings.request_sent is not None and timings.headers is not None
    assert timings.started <= timings.request_sent <= timings.headers
    assert timings.end is not None and timings.end - timings.request_sent < 3


async def test_total_timeout() -> None:
    async def handler(request: web.Request, seen: Seen) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(100):
            await resp.write(chunk(str(i)))
            await asyncio.sleep(0.05)
        return resp

    timeouts = Timeouts(connect=1, first_token=1, idle=1, total=0.5)
    async with (
        raw_server(handler) as server,
        provider_for(server, timeouts=timeouts) as provider,
    ):
        with pytest.raises(TotalTimeout) as info:
            await collect(provider)
    assert info.value.delivered is True
    assert info.value.timeout == 0.5


async def test_slow_consumer_does_not_trip_the_idle_timeout() -> None:
    body = [chunk("a"), chunk("b"), chunk(finish="stop") + DONE]
    timeouts = Timeouts(connect=1, first_token=1, idle=0.2, total=10)
    async with (
        raw_server(serve_bytes(body)) as server,
        provider_for(server, timeouts=timeouts) as provider,
        provider.stream(request()) as stream,
    ):
        got = []
        async for delta in stream:
            got.append(delta.content)
            await asyncio.sleep(0.3)  # the caller's own time is not upstream idleness
    assert got == ["a", "b", ""]


# -- clean-up ----------------------------------------------------------------------------------


async def slow_stream(request: web.Request, seen: Seen) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for i in range(1000):
        await resp.write(chunk(str(i)))
        await asyncio.sleep(0.01)
    return resp


async def test_break_closes_the_connection() -> None:
    async with raw_server(slow_stream) as server, provider_for(server) as provider:
        async with provider.stream(request()) as stream:
            async for _ in stream:
                break
        await asyncio.wait_for(server.seen[0].finished.wait(), 5)
        assert server.seen[0].disconnected
        assert "state=closed" in repr(stream)
        await stream.aclose()  # idempotent
        assert [d async for d in stream] == []


async def test_cancellation_closes_the_connection_and_propagates() -> None:
    async with raw_server(slow_stream) as server, provider_for(server) as provider:
        three = asyncio.Event()

        async def consume() -> None:
            async with provider.stream(request()) as stream:
                async for i, _ in aenumerate(stream):
                    if i == 2:
                        three.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(three.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(server.seen[0].finished.wait(), 5)
        assert server.seen[0].disconnected


async def test_cancellation_during_backoff_propagates() -> None:
    sleeping = asyncio.Event()

    async def sleep(delay: float) -> None:
        sleeping.set()
        await asyncio.sleep(delay)

    async def handler(request: web.Request, seen: Seen) -> web.StreamResponse:
        return error_response(503, b"busy")

    retry = RetrySettings(max_attempts=5, backoff_base=30, backoff_cap=30, jitter=0)
    async with raw_server(handler) as server:
        provider = OpenAIProvider(server.base_url, retry=retry, sleep=sleep)
        async with provider:
            task = asyncio.create_task(collect(provider))
            await asyncio.wait_for(sleeping.wait(), 5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    assert len(server.seen) == 1


async def test_iterating_without_async_with() -> None:
    async with raw_server(serve_bytes(HELLO)) as server, provider_for(server) as provider:
        stream = provider.stream(request())
        text = "".join([d.content async for d in stream])
        await stream.aclose()
    assert text == "Hello world"


async def test_closed_provider_refuses_and_aclose_is_idempotent() -> None:
    async with raw_server(serve_bytes(HELLO)) as server:
        provider = provider_for(server)
        await collect(provider)
        await provider.aclose()
        await provider.aclose()
        with pytest.raises(ProviderClosedError, match="closed"):
            await collect(provider)


async def test_finished_streams_reuse_one_connection() -> None:
    async with raw_server(serve_bytes(HELLO)) as server, provider_for(server) as provider:
        for _ in range(3):
            assert await collect(provider) == "Hello world"
    assert len(server.peers) == 1


async def test_prewarm_opens_the_connection_the_request_uses() -> None:
    async with raw_server(serve_bytes(HELLO)) as server, provider_for(server) as provider:
        await provider.prewarm()
        assert server.models_calls == 1
        async with provider.stream(request()) as stream:
            async for _ in stream:
                pass
        assert stream.connection_reused


async def test_prewarm_skips_when_the_pool_already_has_an_idle_connection() -> None:
    async with raw_server(serve_bytes(HELLO)) as server, provider_for(server) as provider:
        assert await collect(provider) == "Hello world"
        await provider.prewarm()
        assert server.models_calls == 0, "the finished stream's connection is idle in the pool"
        await provider.prewarm(connections=3)
        assert server.models_calls == 2


async def test_prewarm_several_connections_and_failures_are_ignored() -> None:
    async with raw_server(serve_bytes(HELLO)) as server, provider_for(server) as provider:
        await provider.prewarm(connections=4)
        assert server.models_calls == 4
    async with provider_for("http://127.0.0.1:1/v1") as provider:
        await provider.prewarm()


# -- timings -----------------------------------------------------------------------------------


async def test_timings_are_filled_in_order() -> None:
    parts = [
        chunk("", role="assistant"),
        chunk("Hello"),
        chunk(" world"),
        chunk(finish="stop"),
        usage_chunk(1, 2) + DONE,
    ]
    async with (
        raw_server(serve_bytes(parts, pause=0.01)) as server,
        provider_for(server) as provider,
        provider.stream(request()) as stream,
    ):
        n = len([d async for d in stream])
    t = stream.timings
    assert t.attempts == 1
    assert t.request_sent is not None and t.headers is not None and t.first_token is not None
    assert t.end is not None
    assert t.started <= t.request_sent <= t.headers <= t.first_token <= t.end
    assert len(t.chunk_times) == n == 4
    assert t.chunk_times == sorted(t.chunk_times)
    assert t.chunk_times[0] == t.first_token
    assert t.ttft is not None and 0 < t.ttft < 5


async def test_stream_is_a_provider_stream() -> None:
    async with raw_server(serve_bytes(HELLO)) as server, provider_for(server) as provider:
        stream = provider.stream(request())
        assert isinstance(stream, OpenAIStream)
        async with stream:
            pass
        assert stream.request_id == "req-test"


async def test_reset_after_the_finish_reason_is_a_normal_end() -> None:
    async def handler(request: web.Request, seen: Seen) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(chunk("a") + chunk(finish="stop"))
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.abort()
        return resp

    async with raw_server(handler) as server, provider_for(server) as provider:
        assert await collect(provider) == "a"


async def test_no_limits_at_all() -> None:
    timeouts = Timeouts(connect=None, first_token=None, idle=None, total=None)
    async with (
        raw_server(
            serve_bytes([chunk("a"), chunk("b", finish="stop") + DONE], pause=0.02)
        ) as server,
        provider_for(server, timeouts=timeouts) as provider,
    ):
        assert await collect(provider) == "ab"


def test_timeouts_and_retries_on_uvloop() -> None:
    """The watchdog's timer also works on uvloop's coarser clock."""
    uvloop = pytest.importorskip("uvloop")

    async def stalls_after_one(request: web.Request, seen: Seen) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if seen.index == 0:
            await asyncio.sleep(30)  # no first token: retried
        await resp.write(chunk("a"))
        await asyncio.sleep(30)  # then idle
        return resp

    async def scenario() -> tuple[list[str], ProviderError, int]:
        async with (
            raw_server(stalls_after_one) as server,
            provider_for(server, timeouts=FAST) as provider,
            provider.stream(request()) as stream,
        ):
            got: list[str] = []
            try:
                await drain(stream, got)
            except IdleTimeout as exc:
                return got, exc, stream.timings.attempts
        raise AssertionError("no timeout")

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        got, exc, attempts = runner.run(scenario())
    assert got == ["a"]
    assert exc.delivered is True
    assert attempts == 2


async def test_nothing_more_after_an_error_or_a_close() -> None:
    body = chunk("a") + b"data: {oops\n\n" + chunk("b") + chunk(finish="stop") + DONE
    async with (
        raw_server(serve_bytes(body)) as server,
        provider_for(server) as provider,
        provider.stream(request()) as stream,
    ):
        got: list[str] = []
        with pytest.raises(ProtocolError):
            await drain(stream, got)
        assert got == ["a"]
        assert [d async for d in stream] == []
    async with (
        raw_server(serve_bytes(HELLO)) as server,
        provider_for(server) as provider,
        provider.stream(request()) as stream,
    ):
        assert (await anext(stream)).content == "Hello"
        await stream.aclose()
        assert [d async for d in stream] == []
