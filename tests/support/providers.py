"""A scripted upstream for provider tests: real loopback sockets, bytes chosen by each test."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from moa_stream import ChatRequest
from moa_stream.providers import OpenAIProvider, OpenAIStream, RetryPolicy, Timeouts
from support.http import serve_app

Handler = Callable[[web.Request, "Seen"], Awaitable[web.StreamResponse]]


@dataclass
class Seen:
    """What one request looked like on arrival, and how its handler ended."""

    index: int
    body: dict[str, Any]
    headers: dict[str, str]
    peer: tuple[str, int]
    disconnected: bool = False
    finished: asyncio.Event = field(default_factory=asyncio.Event)


def chunk(
    content: str | None = None,
    *,
    role: str | None = None,
    finish: str | None = None,
    **delta: Any,
) -> bytes:
    """One ``data:`` event in the OpenAI chunk shape, LF framed."""
    d: dict[str, Any] = dict(delta)
    if role is not None:
        d["role"] = role
    if content is not None:
        d["content"] = content
    obj = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": d, "finish_reason": finish}],
    }
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def usage_chunk(prompt: int, completion: int) -> bytes:
    obj = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "choices": [],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }
    return b"data: " + orjson.dumps(obj) + b"\n\n"


DONE = b"data: [DONE]\n\n"

#: A complete, well-formed stream answering "Hello world".
HELLO = (
    chunk("", role="assistant")
    + chunk("Hello")
    + chunk(" world")
    + chunk(finish="stop")
    + usage_chunk(5, 2)
    + DONE
)


class RawServer:
    """Runs ``handler`` for every ``POST /v1/chat/completions``; records each request.

    ``GET /v1/models`` answers a fixed list. Handlers are cancelled when their client goes
    away (``Seen.disconnected`` is then set).
    """

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.seen: list[Seen] = []
        self.models_calls = 0
        self.base_url = ""
        self._stack = AsyncExitStack()

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        peer = request.transport.get_extra_info("peername") if request.transport else None
        seen = Seen(
            index=len(self.seen),
            body=orjson.loads(raw) if raw else {},
            headers=dict(request.headers),
            peer=tuple(peer) if peer else ("", 0),
        )
        self.seen.append(seen)
        try:
            return await self.handler(request, seen)
        except (asyncio.CancelledError, ConnectionResetError):
            seen.disconnected = True
            raise
        finally:
            seen.finished.set()

    async def _models(self, request: web.Request) -> web.Response:
        self.models_calls += 1
        return web.json_response({"object": "list", "data": []})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        url = await self._stack.enter_async_context(serve_app(app, shutdown_timeout=0.5))
        self.base_url = url + "/v1"

    async def aclose(self) -> None:
        await self._stack.aclose()

    @property
    def peers(self) -> set[tuple[str, int]]:
        """Distinct client sockets that sent chat requests."""
        return {s.peer for s in self.seen}


@asynccontextmanager
async def raw_server(handler: Handler) -> AsyncIterator[RawServer]:
    server = RawServer(handler)
    await server.start()
    try:
        yield server
    finally:
        await server.aclose()


async def sse_response(
    request: web.Request,
    parts: list[bytes] | bytes,
    *,
    status: int = 200,
    headers: dict[str, str] | None = None,
    pause: float = 0.0,
) -> web.StreamResponse:
    """Write ``parts`` as an event stream, one write each, ``pause`` seconds apart."""
    resp = web.StreamResponse(
        status=status,
        headers={
            "Content-Type": "text/event-stream",
            "x-request-id": "req-test",
            **(headers or {}),
        },
    )
    await resp.prepare(request)
    for part in [parts] if isinstance(parts, bytes) else parts:
        await resp.write(part)
        if pause:
            await asyncio.sleep(pause)
    await resp.write_eof()
    return resp


def serve_bytes(parts: list[bytes] | bytes, **kwargs: Any) -> Handler:
    async def handler(request: web.Request, seen: Seen) -> web.StreamResponse:
        return await sse_response(request, parts, **kwargs)

    return handler


def error_response(
    status: int, body: bytes | dict[str, Any], headers: dict[str, str] | None = None
) -> web.Response:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    content_type = "text/plain" if isinstance(body, bytes) else "application/json"
    return web.Response(
        status=status,
        body=raw,
        content_type=content_type,
        headers={"x-request-id": "req-err", **(headers or {})},
    )


class SleepRecorder:
    """An injected ``sleep`` that records the delays asked for and returns at once."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        await asyncio.sleep(0)


def provider_for(
    server: RawServer | str,
    *,
    timeouts: Timeouts | None = None,
    retry: RetryPolicy | None = None,
    sleep: SleepRecorder | None = None,
    **kwargs: Any,
) -> OpenAIProvider:
    """A provider with deterministic retries (no jitter, instant back-off) by default."""
    base_url = server if isinstance(server, str) else server.base_url
    return OpenAIProvider(
        base_url,
        name="test",
        timeouts=timeouts or Timeouts(connect=5, first_token=5, idle=5, total=20),
        retry=retry or RetryPolicy(max_attempts=3, jitter=0.0),
        sleep=sleep or SleepRecorder(),
        **kwargs,
    )


def request(content: str = "Say hello.", model: str = "m", **kwargs: Any) -> ChatRequest:
    return ChatRequest(messages=[{"role": "user", "content": content}], model=model, **kwargs)


async def collect(provider: OpenAIProvider, req: ChatRequest | None = None) -> str:
    """The content of a whole stream."""
    async with provider.stream(req or request()) as stream:
        return "".join([d.content async for d in stream])


async def drain(stream: OpenAIStream, into: list[str]) -> None:
    """Append every delta's content to ``into`` (kept when the stream fails part-way)."""
    async for delta in stream:
        into.append(delta.content)
