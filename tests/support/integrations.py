"""Helpers for the integration tests: a small simulated config, waiting.

``body`` and the SSE views are re-exported from ``requests`` and ``sse``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from moa_stream.config import Config, loads_config
from moa_stream.sim import SimServer

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


async def wait_for(predicate: Callable[[], bool], within: float = 5.0) -> None:
    """Poll ``predicate`` until true; fail after ``within`` seconds (generous: CI is shared)."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


async def leave_while_proposers_crawl(
    client: Coroutine[Any, Any, None], sim: SimServer | None
) -> None:
    """Run ``client`` (a request to ``crawl-proposers``) and cancel it once both 20 s proposers
    stream: both must end at once, recorded by the simulator as ``client_disconnected``."""
    assert sim is not None
    task = asyncio.create_task(client)
    await wait_for(lambda: sim.active_streams == 2)
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await sim.wait_idle(5)
    assert time.monotonic() - started < 5.0
    records = [r for r in sim.records if r.model == "p-crawl"]
    assert [r.outcome for r in records] == ["client_disconnected"] * 2
