"""Before the first token only ``first_token`` bounds the wait; ``idle`` starts with it.

A server that sends its headers at once and thinks for longer than ``idle`` (the docs' Ollama
and Anthropic examples raise ``first_token`` above ``idle``) must not be cut at ``idle``.
"""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web
from support.providers import DONE, Handler, Seen, chunk, collect, provider_for, raw_server

from moa_stream import FirstTokenTimeout, IdleTimeout
from moa_stream.providers import RetrySettings, Timeouts


def _thinker(think: float, gap: float = 0.0) -> Handler:
    """Headers at once, the first token after ``think`` s, the second ``gap`` s later."""

    async def handler(request: web.Request, seen: Seen) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(chunk("", role="assistant"))
        await asyncio.sleep(think)
        await resp.write(chunk("Hello"))
        await asyncio.sleep(gap)
        await resp.write(chunk(" there", finish="stop") + DONE)
        await resp.write_eof()
        return resp

    return handler


async def test_a_slow_first_token_is_bounded_by_first_token_not_idle() -> None:
    timeouts = Timeouts(connect=2, first_token=3, idle=0.3, total=10)
    async with (
        raw_server(_thinker(0.8)) as server,
        provider_for(server, timeouts=timeouts, retry=RetrySettings(1)) as provider,
    ):
        assert await collect(provider) == "Hello there"


async def test_first_token_still_fires_before_idle_would() -> None:
    timeouts = Timeouts(connect=2, first_token=0.3, idle=5, total=10)
    async with (
        raw_server(_thinker(1.0)) as server,
        provider_for(server, timeouts=timeouts, retry=RetrySettings(1)) as provider,
    ):
        with pytest.raises(FirstTokenTimeout) as info:
            await collect(provider)
    assert info.value.timeout == 0.3


async def test_idle_bounds_the_gaps_after_the_first_token() -> None:
    timeouts = Timeouts(connect=2, first_token=3, idle=0.3, total=10)
    async with (
        raw_server(_thinker(0.0, gap=1.0)) as server,
        provider_for(server, timeouts=timeouts, retry=RetrySettings(1)) as provider,
    ):
        with pytest.raises(IdleTimeout) as info:
            await collect(provider)
    assert info.value.timeout == 0.3
    assert info.value.delivered is True


async def test_without_a_first_token_limit_idle_bounds_the_wait() -> None:
    timeouts = Timeouts(connect=2, first_token=None, idle=0.3, total=10)
    async with (
        raw_server(_thinker(1.0)) as server,
        provider_for(server, timeouts=timeouts, retry=RetrySettings(1)) as provider,
    ):
        with pytest.raises(IdleTimeout):
            await collect(provider)
