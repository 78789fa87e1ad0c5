"""A client that goes away stops generation at once, is recorded, and leaks nothing."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from support.requests import body
from support.sim import CHAT, PROMPT, SIM_MODEL, SIM_MODELS
from support.timing import LoopLag

from moa_stream.sim import LatencyProfile, SimModel, SimServer

# The simulator fixture: two fast models, "m" and "other".
pytestmark = pytest.mark.moa_sim(*SIM_MODELS, seed=0)


def slow_model(ttft: float = 0.01, slots: int | None = None) -> SimModel:
    return SimModel(
        name="m",
        latency=LatencyProfile.fixed(ttft=ttft, tokens_per_s=20),
        answer_tokens=100,
        slots=slots,
    )


async def test_client_closing_mid_stream_is_recorded(session: aiohttp.ClientSession) -> None:
    async with SimServer([slow_model()]) as sim:
        async with session.post(
            sim.base_url + CHAT, json=body(SIM_MODEL, PROMPT, stream=True)
        ) as resp:
            await resp.content.readuntil(b'"content":"')
            await resp.content.readuntil(b"\n\n")
            assert sim.active_streams == 1
            resp.close()
        started = time.monotonic()
        await sim.wait_idle(2)
        assert time.monotonic() - started < 1.0
        (record,) = sim.records
        assert record.outcome == "client_disconnected"
        assert sim.active_streams == 0
        assert sim.in_flight == 0
        assert record.completion_tokens < 10
        assert record.finished_at is not None


async def test_disconnect_during_the_first_token_wait_is_noticed_at_once(
    session: aiohttp.ClientSession,
) -> None:
    async with SimServer([slow_model(ttft=5.0)]) as sim:
        async with session.post(
            sim.base_url + CHAT, json=body(SIM_MODEL, PROMPT, stream=True)
        ) as resp:
            assert resp.status == 200
            resp.close()
        await sim.wait_idle(2)
        (record,) = sim.records
    assert record.outcome == "client_disconnected"
    assert record.first_token_sent_at is None
    assert record.finished_at is not None
    assert record.finished_at - record.received_at < 2.0


async def test_cancelled_client_task_while_queued_for_a_slot(
    session: aiohttp.ClientSession,
) -> None:
    async with SimServer([slow_model(slots=1)]) as sim:

        async def consume(prompt: str) -> None:
            async with session.post(
                sim.base_url + CHAT, json=body(SIM_MODEL, prompt, stream=True)
            ) as resp:
                await resp.read()

        holder = asyncio.create_task(consume("first"))
        waiter = asyncio.create_task(consume("second"))
        while sim.in_flight < 2:  # noqa: ASYNC110 - the server offers no event for arrivals
            await asyncio.sleep(0.01)
        waiter.cancel()
        holder.cancel()
        for task in (holder, waiter):
            with pytest.raises(asyncio.CancelledError):
                await task
        await sim.wait_idle(2)
        outcomes = sorted(r.outcome or "" for r in sim.records)
        assert outcomes == ["client_disconnected", "client_disconnected"]
        assert sim.active_streams == 0


async def test_wait_idle_can_also_wait_for_connections_to_close() -> None:
    async with SimServer([slow_model(ttft=0.0)]) as sim:
        async with (
            aiohttp.ClientSession() as session,
            session.post(sim.base_url + CHAT, json=body(SIM_MODEL, PROMPT, stream=True)) as resp,
        ):
            await resp.content.readuntil(b"\n\n")
        await sim.wait_idle(2, connections=True)
        assert sim.open_connections == 0


async def test_wait_idle_times_out_while_a_request_runs(session: aiohttp.ClientSession) -> None:
    async with SimServer([slow_model(ttft=0.0)]) as sim:
        async with session.post(
            sim.base_url + CHAT, json=body(SIM_MODEL, PROMPT, stream=True)
        ) as resp:
            await resp.content.readuntil(b"\n\n")
            with pytest.raises(TimeoutError):
                await sim.wait_idle(0.05)
            resp.close()
        await sim.wait_idle(2)


async def test_closing_the_server_cuts_streams_in_progress(
    session: aiohttp.ClientSession,
) -> None:
    sim = SimServer([slow_model()])
    await sim.start()
    try:
        async with session.post(
            sim.base_url + CHAT, json=body(SIM_MODEL, PROMPT, stream=True)
        ) as resp:
            await resp.content.readuntil(b'"content":"')
            started = time.monotonic()
            await sim.aclose()
            assert time.monotonic() - started < 1.5
            with pytest.raises(aiohttp.ClientError):
                await resp.read()
    finally:
        await sim.aclose()
    (record,) = sim.records
    assert record.outcome == "error"
    assert sim.active_streams == 0
    assert sim.in_flight == 0


async def test_start_and_aclose_are_idempotent() -> None:
    sim = SimServer([slow_model()])
    await sim.start()
    await sim.start()
    port = sim.port
    assert port != 0
    assert sim.base_url == f"http://127.0.0.1:{port}/v1"
    await sim.aclose()
    await sim.aclose()
    with pytest.raises(RuntimeError):
        await sim.start()


async def test_aclose_without_start_is_fine() -> None:
    await SimServer([slow_model()]).aclose()


async def test_records_are_bounded(session: aiohttp.ClientSession) -> None:
    async with SimServer([SimModel(name="m", answer_tokens=1)], records_maxlen=3) as sim:
        for i in range(5):
            async with session.post(sim.base_url + CHAT, json=body(SIM_MODEL, f"p{i}")) as resp:
                await resp.read()
        assert len(sim.records) == 3
        sim.clear_records()
        assert sim.records == []


async def test_many_concurrent_streams_keep_their_schedule(
    session: aiohttp.ClientSession,
) -> None:
    """64 streams of 100 tokens at 200 tokens/s: first tokens go out close to their plan.

    Served one after another, the median stream would be about 19 s late; concurrently it is
    late only by what the loop itself was late by (measured alongside) plus a margin."""
    model = SimModel(
        name="m", latency=LatencyProfile.fixed(ttft=0.1, tokens_per_s=200), answer_tokens=100
    )
    async with SimServer([model]) as sim:

        async def one(i: int) -> None:
            async with session.post(
                sim.base_url + CHAT, json=body(SIM_MODEL, f"p{i}", stream=True)
            ) as resp:
                await resp.read()

        connector_limit = session.connector.limit if session.connector else 100
        assert connector_limit >= 64
        async with LoopLag() as lag:
            await asyncio.gather(*(one(i) for i in range(64)))
        records = sim.records
    assert all(r.outcome == "complete" for r in records)
    lateness = sorted(
        (r.first_token_sent_at or 0.0) - (r.scheduled_first_token_at or 0.0) for r in records
    )
    assert lateness[len(lateness) // 2] < 0.25 + lag.worst
