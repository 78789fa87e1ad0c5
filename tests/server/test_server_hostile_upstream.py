"""An upstream that puts the API key where the server copies text from (its ``x-request-id``
header, its error body) gets none of it to the client: not in a 502 body, not in a
``proposer.failed`` progress item, not in the log."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from structlog.testing import capture_logs
from support.http import serve_app
from support.requests import CHAT, body
from support.server import CONFIG, Running, agent_moas, serving, stream

from moa_stream.config import loads_config

KEY = "sk-hostile-upstream-0123456789abcdef"


async def _hostile(request: web.Request) -> web.Response:
    return web.json_response(
        {"error": {"message": f"bad key {KEY}", "code": KEY, "type": "x" * 5000}},
        status=500,
        headers={"x-request-id": KEY + "-" + "r" * 5000},
    )


@pytest.fixture
async def hostile_srv() -> AsyncIterator[Running]:
    upstream = web.Application()
    upstream.router.add_post("/v1/chat/completions", _hostile)
    async with serve_app(upstream) as url:
        extra = f"""
[providers.hostile]
kind = "openai"
base_url = "{url}/v1"
api_key = "{KEY}"
retry = {{ max_attempts = 1 }}
"""
        extra += agent_moas("hostile", "hostile", "m")
        async with serving(loads_config(CONFIG + extra, "<test config>")) as running:
            yield running


def _leaks(text: str) -> bool:
    return KEY in text or KEY[:8] in text


async def test_the_key_reaches_no_client_through_a_502(
    hostile_srv: Running, session: aiohttp.ClientSession
) -> None:
    with capture_logs() as logs:
        async with session.post(hostile_srv.url + CHAT, json=body("hostile-aggregator")) as resp:
            assert resp.status == 502
            text = await resp.text()
    assert not _leaks(text), text[:500]
    assert len(text) < 4000
    assert not _leaks(repr(logs))


async def test_the_key_reaches_no_client_through_progress(
    hostile_srv: Running, session: aiohttp.ClientSession
) -> None:
    sse = await stream(
        session, hostile_srv.url, body("hostile-proposer"), headers={"X-MoA-Progress": "1"}
    )
    assert sse.status == 200
    raw = "\n".join(e.text for e in sse.events)
    failed = [item for item in sse.progress() if item["type"] == "proposer.failed"]
    assert failed, "the hostile proposer failed and said so"
    assert not _leaks(raw)
    assert all(len(item["error"]) < 2000 for item in failed)
