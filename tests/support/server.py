"""Helpers for the server tests: a fast simulated config, a running app, raw HTTP.

``CHAT``, ``body``, ``SSE`` and ``parse_sse`` are re-exported from ``requests`` and ``sse``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp

from moa_stream.config import Config, Runtime, ServerConfig, loads_config
from moa_stream.server import create_app, serve
from moa_stream.server.app import MoAServer
from support.http import serve_app
from support.requests import CHAT
from support.sse import SSE, Event, parse_sse

# Every model has a fixed latency of tens of milliseconds, so a run takes about 0.1 s.
# Agents that fail do so on every request (probability 1) and are never retried.
CONFIG = """
[providers.sim]
kind = "sim"
timeouts = { connect = 2, first_token = 5, idle = 5, total = 30 }
retry = { max_attempts = 1 }

[sim]
seed = 0

[sim.models.p-fast]
ttft = 0.02
tokens_per_s = 1000
answer_tokens = 8

[sim.models.p-slow]
ttft = 0.04
tokens_per_s = 1000
answer_tokens = 8

[sim.models.agg]
ttft = 0.02
tokens_per_s = 1000
answer_tokens = 12

[sim.models.p-crawl]
ttft = 0.01
tokens_per_s = 20
answer_tokens = 400

[sim.models.agg-crawl]
ttft = 0.01
tokens_per_s = 20
answer_tokens = 400

[sim.models.broken]
ttft = 0.01
tokens_per_s = 1000
answer_tokens = 8
faults = { server_error = 1.0 }

[sim.models.agg-midfail]
ttft = 0.01
tokens_per_s = 1000
answer_tokens = 40
faults = { error_frame = 1.0 }

[agents.a]
provider = "sim"
model = "p-fast"

[agents.b]
provider = "sim"
model = "p-slow"

[agents.agg]
provider = "sim"
model = "agg"

[agents.crawl1]
provider = "sim"
model = "p-crawl"

[agents.crawl2]
provider = "sim"
model = "p-crawl"

[agents.agg-crawl]
provider = "sim"
model = "agg-crawl"

[agents.broken]
provider = "sim"
model = "broken"

[agents.agg-midfail]
provider = "sim"
model = "agg-midfail"

[moa.fast]
description = "Two fast proposers, wait for both."
proposers = ["a", "b"]
aggregator = "agg"
policy = "wait_all"

[moa.single]
preset = "single"
aggregator = "agg"

[moa.degraded]
description = "One proposer always fails; the layer goes on with the other."
proposers = ["a", "broken"]
aggregator = "agg"
policy = "wait_all"

[moa.layer-raise]
proposers = ["broken"]
aggregator = "agg"
on_unmet = "raise"

[moa.agg-broken]
proposers = ["a"]
aggregator = "broken"

[moa.agg-midfail]
proposers = ["a"]
aggregator = "agg-midfail"

[moa.crawl-proposers]
description = "Proposers that take 20 s: the client is gone long before."
proposers = ["crawl1", "crawl2"]
aggregator = "agg"
policy = "wait_all"

[moa.crawl-aggregator]
proposers = ["a"]
aggregator = "agg-crawl"

[moa.no-proposer]
description = "Every proposer fails; the aggregator answers alone."
proposers = ["broken"]
aggregator = "agg"
"""

MOA_IDS = [
    "fast",
    "single",
    "degraded",
    "layer-raise",
    "agg-broken",
    "agg-midfail",
    "crawl-proposers",
    "crawl-aggregator",
    "no-proposer",
]


def config(**server: Any) -> Config:
    """The test config, with ``[server]`` fields replaced by ``server``."""
    cfg = loads_config(CONFIG, "<test config>")
    return dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, **server))


def stairs_config(*, restarts: bool) -> Config:
    """The test config and the staircase MoA ``stairs``: the fast proposer ``a`` and two steady
    ones (60 tokens at 150/s), the aggregator asked at 4 and 8 tokens. The aggregator (40 tokens
    at 200/s) is ``agg-restarts``, which refuses a prefilled answer and restarts after each turn
    (so its steps are rejected), if ``restarts``; else ``agg-steady``."""
    agg = "agg-restarts" if restarts else "agg-steady"
    continuation = "continuation = { refuse_prefill = 1.0, restart_after_turn = 1.0 }"
    stairs = f"""
[sim.models.p-steady]
ttft = 0.02
tokens_per_s = 150
answer_tokens = 60

[sim.models.{agg}]
ttft = 0.02
tokens_per_s = 200
answer_tokens = 40
{continuation if restarts else ""}

[agents]
s1 = {{ provider = "sim", model = "p-steady" }}
s2 = {{ provider = "sim", model = "p-steady" }}
{agg} = {{ provider = "sim", model = "{agg}" }}

[moa.stairs]
proposers = ["a", "s1", "s2"]
aggregator = "{agg}"
policy = "partial(1, min_tokens=4)"
staircase = {{ steps = [4, 8], lead = false }}
"""
    return loads_config(CONFIG + stairs, "<test config>")


def agent_moas(agent: str, provider: str, model: str) -> str:
    """TOML for the agent ``agent`` (``model`` on ``provider``) and two MoAs around it:
    ``{agent}-proposer``, where it proposes beside ``a`` (both awaited) for ``agg``, and
    ``{agent}-aggregator``, where it aggregates ``a``."""
    return f"""
[agents.{agent}]
provider = "{provider}"
model = "{model}"

[moa.{agent}-proposer]
proposers = ["{agent}", "a"]
aggregator = "agg"
policy = "wait_all"

[moa.{agent}-aggregator]
proposers = ["a"]
aggregator = "{agent}"
"""


@dataclass
class Running:
    """A server on a free loopback port, its runtime and its state."""

    url: str
    runtime: Runtime
    state: MoAServer

    @property
    def sim(self) -> Any:
        return self.runtime.sim


@contextlib.asynccontextmanager
async def serving(
    cfg: Config | None = None, server: ServerConfig | None = None
) -> AsyncIterator[Running]:
    """Start the runtime and the app as ``moa-stream serve`` does (handler cancellation on)."""
    cfg = cfg if cfg is not None else config()
    async with Runtime(cfg) as runtime:
        app = create_app(runtime, server)
        async with serve_app(app, access_log=None, shutdown_timeout=1) as url:
            yield Running(url, runtime, app[MoAServer.KEY])


async def stream(
    session: aiohttp.ClientSession, url: str, payload: dict[str, Any], **kwargs: Any
) -> SSE:
    """POST a streaming request and read the whole body."""
    async with session.post(url + CHAT, json={**payload, "stream": True}, **kwargs) as resp:
        raw = await resp.read()
        if resp.content_type != "text/event-stream":
            return SSE(resp.status, resp.headers, [Event("data", raw.decode())])
        return SSE(resp.status, resp.headers, parse_sse(raw))


@contextlib.asynccontextmanager
async def serving_like_cli(cfg: Config) -> AsyncIterator[str]:
    """Run :func:`moa_stream.server.serve` in this process, as ``moa-stream serve`` does (the
    connection guard and aiohttp's keep-alive timeout included); yields the base URL."""
    stop = asyncio.Event()
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        serve(cfg, host="127.0.0.1", port=0, stop=stop, on_ready=ready.set_result)
    )
    try:
        await asyncio.wait({task, ready}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            task.result()  # raises what made it stop
        yield ready.result()
    finally:
        stop.set()
        await task


def host_port(url: str) -> tuple[str, int]:
    host, _, port = url.removeprefix("http://").partition(":")
    return host, int(port)


async def read_until_closed(reader: asyncio.StreamReader, within: float) -> bytes:
    """Everything the server sends until it closes the connection; fails after ``within`` s."""
    async with asyncio.timeout(within):
        return await reader.read()


async def raw_request(url: str, data: bytes, within: float = 10.0) -> bytes:
    """Send ``data`` on a fresh connection and read until the server closes it."""
    reader, writer = await asyncio.open_connection(*host_port(url))
    try:
        writer.write(data)
        await writer.drain()
        return await read_until_closed(reader, within)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def split_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and body of one raw HTTP/1.1 response."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, rest
