"""A stream that reached ``data: [DONE]`` is an ``ok`` request, however the client hangs up.

curl, the OpenAI SDKs and browsers close the connection as soon as they have the end of the
stream. A staircase run still has proposers to cancel (or ``keep`` stragglers to wait for)
after ``run.done``; the client's hang-up cancels that clean-up, and the request used to be
logged and counted as ``client_disconnected`` (499) although the client had the whole answer.
"""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
import yarl
from support.requests import CHAT, body
from support.server import CONFIG, Running, serving
from test_server_metrics import scrape, value

from moa_stream.config import loads_config

# The answer is done long before the crawling proposer: the run's close waits for it
# (``keep``), so the client always hangs up while the handler is still closing the run.
STAIRCASE = """
[moa.stairs]
proposers = ["a", "crawl1"]
aggregator = "agg"
policy = "partial(1, min_tokens=2)"
stragglers = "keep"
staircase = { steps = [4], lead = false }
"""


async def _read_to_done_and_hang_up(url: str, payload: dict[str, object]) -> bytes:
    """POST a streamed request over a raw socket, read to ``[DONE]`` and close at once, as
    curl does at the end of a chunked body."""
    parsed = yarl.URL(url)
    reader, writer = await asyncio.open_connection(parsed.host, parsed.port)
    data = orjson.dumps(payload)
    writer.write(
        (
            f"POST {CHAT} HTTP/1.1\r\nHost: {parsed.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n"
        ).encode()
        + data
    )
    received = b""
    async with asyncio.timeout(10):
        while b"data: [DONE]" not in received:
            chunk = await reader.read(65536)
            assert chunk, f"the server closed before [DONE]: {received[-300:]!r}"
            received += chunk
    writer.close()
    return received


async def test_finished_staircase_stream_is_ok_when_the_client_hangs_up() -> None:
    cfg = loads_config(CONFIG + STAIRCASE, "<test config>")
    running: Running
    async with serving(cfg) as running, aiohttp.ClientSession() as session:
        received = await _read_to_done_and_hang_up(running.url, body("stairs", stream=True))
        assert received.startswith(b"HTTP/1.1 200")
        families = None
        requests = "moa_stream_requests_total"
        async with asyncio.timeout(5):
            while True:
                families = await scrape(session, running.url)
                counted = sum(
                    v for _, labels, v in families[requests].samples if labels["model"] == "stairs"
                )
                if counted:
                    break
                await asyncio.sleep(0.05)
        assert value(families, requests, model="stairs", outcome="ok") == 1
        assert value(families, requests, model="stairs", outcome="client_disconnected") == 0
