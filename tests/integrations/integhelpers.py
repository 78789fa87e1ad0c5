"""Helpers for the integration tests: a small simulated config, SSE parsing, waiting."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import orjson

from moa_stream.config import Config, loads_config

# Fixed latencies of tens of milliseconds; "crawl" models take about 20 s, so a test that ends
# quickly proves the run was cancelled.
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

[agents.a]
provider = "sim"
model = "p-fast"

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

[moa.fast]
description = "One fast proposer and the aggregator."
proposers = ["a"]
aggregator = "agg"

[moa.agg-broken]
proposers = ["a"]
aggregator = "broken"

[moa.crawl-proposers]
proposers = ["crawl1", "crawl2"]
aggregator = "agg"
policy = "wait_all"

[moa.crawl-aggregator]
proposers = ["a"]
aggregator = "agg-crawl"
"""

# Options of the pytest runs inside tests (pytester): neither a cache nor hypothesis's plugin,
# whose report imports all of hypothesis (seconds per run on a loaded machine).
INNER = ("-p", "no:cacheprovider", "-p", "no:hypothesispytest")

MOA_IDS = ["fast", "agg-broken", "crawl-proposers", "crawl-aggregator"]


def config(extra: str = "") -> Config:
    """The test config, with ``extra`` TOML appended (a ``[server]`` table, say)."""
    return loads_config(CONFIG + extra, "<integration test config>")


def body(
    model: str = "fast", content: str = "Why is the sky blue?", **extra: Any
) -> dict[str, Any]:
    """A chat-completions body with one user message."""
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def sse_items(raw: bytes) -> list[tuple[str, str]]:
    """The data payloads and comment lines of a complete SSE body, in order."""
    items = []
    for block in raw.decode().split("\n\n"):
        for line in block.split("\n"):
            if line.startswith(":"):
                items.append(("comment", line[1:]))
            elif line.startswith("data: "):
                items.append(("data", line[len("data: ") :]))
            elif line:
                raise AssertionError(f"unexpected SSE line {line!r}")
    return items


def sse_chunks(raw: bytes) -> list[dict[str, Any]]:
    """The JSON data payloads of an SSE body, ``[DONE]`` excluded (it must be last)."""
    data = [text for kind, text in sse_items(raw) if kind == "data"]
    assert data[-1] == "[DONE]", data[-3:]
    return [orjson.loads(d) for d in data[:-1]]


def sse_text(raw: bytes) -> str:
    """The answer text of an SSE body."""
    return "".join(
        c["choices"][0]["delta"].get("content") or "" for c in sse_chunks(raw) if c.get("choices")
    )


async def wait_for(predicate: Callable[[], bool], within: float = 5.0) -> None:
    """Poll ``predicate`` until true; fail after ``within`` seconds (generous: CI is shared)."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)
