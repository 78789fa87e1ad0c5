"""A client that goes away cancels every upstream request of its run at once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import aiohttp
import pytest
from support.requests import CHAT, body
from support.server import Running


async def wait_for(predicate: Callable[[], bool], within: float = 2.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


@pytest.mark.parametrize("progress", [True, False])
async def test_disconnect_while_proposers_run(
    srv: Running, session: aiohttp.ClientSession, progress: bool
) -> None:
    """The proposers would run for 20 s; closing the client's connection ends them at once.

    Without progress the response headers are not even out yet (they wait for the first
    token), so this is a disconnect before the response started.
    """
    sim = srv.sim
    payload = body("crawl-proposers", stream=True, moa_stream={"progress": progress})

    async def client() -> None:
        async with session.post(srv.url + CHAT, json=payload) as resp:
            async for _ in resp.content:
                pass

    task = asyncio.create_task(client())
    await wait_for(lambda: sim.active_streams == 2)
    assert srv.state.active == 1
    assert srv.state.metrics.active_streams.value() == 1
    started = time.monotonic()
    task.cancel()  # closes the connection, whether or not the headers had arrived
    with pytest.raises(asyncio.CancelledError):
        await task
    await sim.wait_idle(2)
    assert time.monotonic() - started < 3.0, "upstream requests of 20 s ended at once"
    assert sim.active_streams == 0
    records = [r for r in sim.records if r.model == "p-crawl"]
    assert len(records) == 2
    assert {r.outcome for r in records} == {"client_disconnected"}
    await wait_for(lambda: srv.state.active == 0)
    assert srv.state.metrics.active_streams.value() == 0
    assert srv.state.metrics.requests.value("crawl-proposers", "client_disconnected") == 1


async def test_disconnect_while_the_aggregator_streams(
    srv: Running, session: aiohttp.ClientSession
) -> None:
    sim = srv.sim
    async with session.post(srv.url + CHAT, json=body("crawl-aggregator", stream=True)) as resp:
        assert resp.status == 200
        await resp.content.readuntil(b'"content":"')  # the role chunk
        await resp.content.readuntil(b'"content":"')  # a real token
        assert sim.active_streams == 1
        resp.close()
    await sim.wait_idle(2)
    (record,) = [r for r in sim.records if r.model == "agg-crawl"]
    assert record.outcome == "client_disconnected"
    assert record.completion_tokens < 50
    await wait_for(lambda: srv.state.active == 0)
    assert srv.state.metrics.active_streams.value() == 0
    assert srv.state.metrics.requests.value("crawl-aggregator", "client_disconnected") == 1


async def test_client_task_cancelled_mid_request(
    srv: Running, session: aiohttp.ClientSession
) -> None:
    """A non-streamed request whose client task is cancelled: same clean-up."""

    async def call() -> None:
        async with session.post(srv.url + CHAT, json=body("crawl-proposers")) as resp:
            await resp.read()

    task = asyncio.create_task(call())
    await wait_for(lambda: srv.sim.active_streams == 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await srv.sim.wait_idle(2)
    assert srv.sim.active_streams == 0
    await wait_for(lambda: srv.state.active == 0)
