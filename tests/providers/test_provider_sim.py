"""OpenAIProvider against the simulated upstream: every fault kind, every timeout it can
provoke, retries, and that leaving a stream early disconnects it on the server side."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from support.providers import SleepRecorder, provider_for, request

from moa_stream import (
    FirstTokenTimeout,
    IdleTimeout,
    ModelNotFoundError,
    ProtocolError,
    RateLimitError,
    StreamInterruptedError,
    TotalTimeout,
    UpstreamError,
)
from moa_stream.providers import OpenAIProvider, RetrySettings, Timeouts
from moa_stream.sim import LatencyProfile, SimModel, SimServer

FAST = LatencyProfile.fixed(ttft=0.02, tokens_per_s=500)
SLOW = LatencyProfile.fixed(ttft=0.01, tokens_per_s=20)
TIGHT = Timeouts(connect=2, first_token=0.4, idle=0.4, total=20)


@pytest.fixture
async def sim() -> AsyncIterator[SimServer]:
    models = [
        SimModel(name="m", latency=FAST, answer_tokens=20),
        SimModel(name="slow", latency=SLOW, answer_tokens=200),
    ]
    async with SimServer(models=models, seed=0) as server:
        yield server


@pytest.fixture
async def provider(sim: SimServer) -> AsyncIterator[OpenAIProvider]:
    async with provider_for(sim.base_url, timeouts=TIGHT) as p:
        yield p


def fault(kind: str, key: str | None, **more: Any) -> dict[str, Any]:
    """Force ``kind`` on the first request with ``key``, or on every request if ``key`` is None."""
    options: dict[str, Any] = {"fault": kind, **more}
    if key is not None:
        options.update(key=key, times=1)
    return {"sim": options}


async def run(provider: OpenAIProvider, **kwargs: Any) -> tuple[str, Any]:
    """The stream's text, and the stream (for its timings and usage)."""
    async with provider.stream(request(**kwargs)) as stream:
        text = "".join([d.content async for d in stream])
    return text, stream


async def test_happy_path_with_server_usage(sim: SimServer, provider: OpenAIProvider) -> None:
    text, stream = await run(provider)
    (record,) = sim.records
    assert text
    assert stream.finish_reason == "stop" == record.finish_reason
    assert stream.usage.estimated is False
    assert stream.usage.completion_tokens == record.completion_tokens == 20
    assert stream.usage.prompt_tokens == record.prompt_tokens
    assert stream.timings.attempts == 1
    assert stream.timings.ttft >= 0.015
    assert len(stream.timings.chunk_times) >= 20
    assert stream.request_id == record.request_id
    assert record.outcome == "complete"


async def test_rate_limit_is_retried_after_the_servers_delay(sim: SimServer) -> None:
    sleep = SleepRecorder()
    async with provider_for(sim.base_url, timeouts=TIGHT, sleep=sleep) as provider:
        text, stream = await run(provider, extra=fault("rate_limit", "rl", retry_after=0.25))
    assert text
    assert stream.timings.attempts == 2
    assert sleep.delays == [pytest.approx(0.25)]  # retry-after-ms is preferred
    assert [r.status for r in sim.records] == [429, 200]


async def test_persistent_rate_limit_gives_up(sim: SimServer, provider: OpenAIProvider) -> None:
    with pytest.raises(RateLimitError) as info:
        await run(provider, extra=fault("rate_limit", None, retry_after=0.1))
    assert info.value.retry_after == pytest.approx(0.1)
    assert info.value.status == 429
    assert info.value.request_id == sim.records[-1].request_id
    assert len(sim.records) == 3


async def test_server_error_is_retried(sim: SimServer, provider: OpenAIProvider) -> None:
    text, stream = await run(provider, extra=fault("server_error", "se"))
    assert text
    assert stream.timings.attempts == 2


async def test_stall_first_is_retried_after_the_first_token_timeout(
    sim: SimServer, provider: OpenAIProvider
) -> None:
    text, stream = await run(provider, extra=fault("stall_first", "sf", stall_s=30))
    assert text
    assert stream.timings.attempts == 2
    await sim.wait_idle(5)
    first, second = sim.records
    assert first.outcome == "client_disconnected"
    assert second.outcome == "complete"


async def test_stall_first_without_retries_is_a_first_token_timeout(sim: SimServer) -> None:
    async with provider_for(sim.base_url, timeouts=TIGHT, retry=RetrySettings(1)) as provider:
        with pytest.raises(FirstTokenTimeout) as info:
            await run(provider, extra=fault("stall_first", None, stall_s=30))
    assert info.value.delivered is False


async def test_stall_mid_is_an_idle_timeout_and_not_retried(
    sim: SimServer, provider: OpenAIProvider
) -> None:
    with pytest.raises(IdleTimeout) as info:
        await run(provider, extra=fault("stall_mid", None, stall_s=30, after=3))
    assert info.value.delivered is True
    assert len(sim.records) == 1
    await sim.wait_idle(5)
    assert sim.records[0].outcome == "client_disconnected"


async def test_reset_mid_is_interrupted_and_not_retried(
    sim: SimServer, provider: OpenAIProvider
) -> None:
    with pytest.raises(StreamInterruptedError) as info:
        await run(provider, extra=fault("reset_mid", None, after=3))
    assert info.value.delivered is True
    assert info.value.status == 200
    assert len(sim.records) == 1


async def test_reset_before_the_first_token_is_retried(
    sim: SimServer, provider: OpenAIProvider
) -> None:
    text, stream = await run(provider, extra=fault("reset_mid", "r0", after=0))
    assert text
    assert stream.timings.attempts == 2


async def test_malformed_chunk_is_a_protocol_error(
    sim: SimServer, provider: OpenAIProvider
) -> None:
    with pytest.raises(ProtocolError) as info:
        await run(provider, extra=fault("malformed", None, after=2))
    assert info.value.delivered is True


async def test_error_frame_is_an_upstream_error(sim: SimServer, provider: OpenAIProvider) -> None:
    with pytest.raises(UpstreamError) as info:
        await run(provider, extra=fault("error_frame", None, after=2))
    assert info.value.delivered is True
    assert info.value.status == 200
    assert info.value.message


async def test_keepalive_comments_are_ignored(sim: SimServer, provider: OpenAIProvider) -> None:
    text, stream = await run(provider, extra=fault("keepalive", "ka"))
    assert text
    assert stream.usage.completion_tokens == 20


async def test_total_timeout(sim: SimServer) -> None:
    timeouts = Timeouts(connect=2, first_token=2, idle=2, total=0.5)
    async with provider_for(sim.base_url, timeouts=timeouts) as provider:
        with pytest.raises(TotalTimeout) as info:
            await run(provider, model="slow")
    assert info.value.delivered is True


async def test_unknown_model(sim: SimServer, provider: OpenAIProvider) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        await run(provider, model="nope")
    assert info.value.status == 404
    assert info.value.code == "model_not_found"
    assert info.value.request_id == sim.records[0].request_id
    assert len(sim.records) == 1


async def test_cancelling_the_consumer_disconnects(
    sim: SimServer, provider: OpenAIProvider
) -> None:
    two = asyncio.Event()

    async def consume() -> None:
        async with provider.stream(request(model="slow")) as stream:
            async for _ in stream:
                if len(stream.timings.chunk_times) == 2:
                    two.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(two.wait(), 5)
    assert sim.active_streams == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await sim.wait_idle(5)
    (record,) = sim.records
    assert record.outcome == "client_disconnected"
    assert sim.active_streams == 0


async def test_breaking_out_disconnects(sim: SimServer, provider: OpenAIProvider) -> None:
    async with provider.stream(request(model="slow")) as stream:
        async for _ in stream:
            break
    await sim.wait_idle(5)
    assert sim.records[0].outcome == "client_disconnected"
    assert sim.records[0].completion_tokens < 200


async def test_many_concurrent_streams(sim: SimServer, provider: OpenAIProvider) -> None:
    results = await asyncio.gather(*(run(provider, content=f"q{i}") for i in range(32)))
    assert all(text for text, _ in results)
    assert {r.outcome for r in sim.records} == {"complete"}


async def test_prewarmed_connection_serves_the_request(
    sim: SimServer, provider: OpenAIProvider
) -> None:
    await provider.prewarm()
    assert sim.open_connections == 1
    await run(provider)
    assert sim.open_connections == 1
