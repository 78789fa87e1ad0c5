"""Suite-wide fixtures and checks.

Checks: every async test must leave no task of its own behind, and no test's logging set-up
reaches the next. Fixtures: ``session`` (an aiohttp client), ``sim`` (the simulator of the
moa_stream pytest plugin's ``moa_sim``, its models chosen by a ``moa_sim`` marker) and
``app_server`` (serves an aiohttp application on a free loopback port). Helpers live in
``support``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web
from hypothesis import HealthCheck, settings
from support.http import AppServer, serve_app

from moa_stream.sim import SimServer

# pytester runs pytest inside a test: how the moa_stream pytest plugin is tested.
pytest_plugins = ["pytester"]

# No per-example deadline and no "too slow" health check: on a loaded machine a plain
# example can take seconds, which says nothing about the code under test.
settings.register_profile("moa_stream", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("moa_stream")


@pytest.fixture(autouse=True)
def _fresh_structlog() -> Iterator[None]:
    """Commands called in-process configure structlog globally; no test may see another's."""
    yield
    structlog.reset_defaults()


@pytest.fixture(autouse=True)
async def _no_leaked_tasks() -> AsyncIterator[None]:
    before = set(asyncio.all_tasks())
    yield
    current = asyncio.current_task()
    # Give just-cancelled tasks a few loop turns to unwind before judging.
    for _ in range(20):
        leaked = [
            t for t in asyncio.all_tasks() if t not in before and t is not current and not t.done()
        ]
        if not leaked:
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"tasks left pending after the test: {leaked!r}")


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
def sim(moa_sim: SimServer) -> SimServer:
    """The plugin's simulator under the name the suite uses; a module picks its models with
    ``pytestmark = pytest.mark.moa_sim(...)``."""
    return moa_sim


@pytest.fixture
async def app_server() -> AsyncIterator[AppServer]:
    """``await app_server(app, **runner_options)``: serve ``app`` on 127.0.0.1 (handler
    cancellation on unless told otherwise) and get its ``http://host:port``; stopped after the
    test."""
    async with AsyncExitStack() as stack:

        async def start(app: web.Application, **options: Any) -> str:
            return await stack.enter_async_context(serve_app(app, **options))

        yield start
