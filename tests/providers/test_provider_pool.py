"""The connection pool counts its own idle keep-alive connections (aiohttp has no public
count), and nothing in the package reaches into aiohttp's private attributes."""

from __future__ import annotations

import re
from pathlib import Path

from aiohttp import web
from support.providers import HELLO, Seen, collect, provider_for, raw_server, sse_response

import moa_stream


async def test_a_connection_the_server_closes_is_not_counted_idle() -> None:
    async def closes(request: web.Request, seen: Seen) -> web.StreamResponse:
        return await sse_response(request, HELLO, headers={"Connection": "close"})

    async with raw_server(closes) as server, provider_for(server) as provider:
        assert await collect(provider) == "Hello world"
        await provider.prewarm()
        assert server.models_calls == 1, "the closed connection was not taken for an idle one"


async def test_a_reused_connection_is_no_longer_idle() -> None:
    async def hello(request: web.Request, seen: Seen) -> web.StreamResponse:
        return await sse_response(request, HELLO)

    async with raw_server(hello) as server, provider_for(server) as provider:
        await provider.prewarm()
        assert server.models_calls == 1
        async with provider.stream(provider_request()) as stream:
            # The request took the prewarmed connection: none is idle while it runs.
            assert stream.connection_reused
            await provider.prewarm()
            assert server.models_calls == 2
            async for _ in stream:
                pass


def provider_request() -> moa_stream.ChatRequest:
    return moa_stream.ChatRequest([{"role": "user", "content": "Hi"}], "m")


def test_no_private_aiohttp_attribute_is_used() -> None:
    root = Path(moa_stream.__file__).parent
    pattern = re.compile(r"\b(session|connector|conn|resp|response|content|transport)\._[a-z]")
    offenders = [
        f"{path.relative_to(root)}:{n}: {line.strip()}"
        for path in root.rglob("*.py")
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line) or "_conns" in line
    ]
    assert offenders == []
