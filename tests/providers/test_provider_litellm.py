"""LiteLLMProvider on loopback against the simulator (LiteLLM's OpenAI-compatible route):
text, usage, errors translated to ours, retries before the first token, closing."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from typing import Any

import pytest
from support.providers import SleepRecorder

from moa_stream import (
    ChatRequest,
    ModelNotFoundError,
    ProviderClosedError,
    RateLimitError,
    StreamInterruptedError,
)
from moa_stream.providers import LiteLLMProvider, RetrySettings, Timeouts
from moa_stream.sim import LatencyProfile, SimModel, SimServer

pytest.importorskip("litellm", reason="the litellm extra is not installed")

# LiteLLM's own modules warn on import and first use (pydantic and deprecation notices);
# they are not this library's to fix.
pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::PendingDeprecationWarning"),
]

FAST = LatencyProfile.fixed(ttft=0.01, tokens_per_s=1000)


@pytest.fixture
async def sim() -> AsyncIterator[SimServer]:
    async with SimServer(models=[SimModel(name="m", latency=FAST, answer_tokens=15)]) as server:
        yield server


def provider_for(sim: SimServer, **kwargs: Any) -> LiteLLMProvider:
    kwargs.setdefault("timeouts", Timeouts(connect=10, first_token=10, idle=10, total=30))
    kwargs.setdefault("retry", RetrySettings(max_attempts=3, jitter=0.0))
    kwargs.setdefault("sleep", SleepRecorder())
    return LiteLLMProvider(name="lite", api_base=sim.base_url, api_key="sk-test", **kwargs)


def request(**extra: Any) -> ChatRequest:
    return ChatRequest([{"role": "user", "content": "Hi"}], "openai/m", extra=extra)


async def read(provider: LiteLLMProvider, req: ChatRequest, into: list[str] | None = None) -> str:
    got = [] if into is None else into
    async with provider.stream(req) as stream:
        async for delta in stream:
            got.append(delta.content)
    return "".join(got)


async def test_streams_text_and_usage_from_the_simulator(sim: SimServer) -> None:
    async with provider_for(sim) as provider, provider.stream(request()) as stream:
        text = "".join([d.content async for d in stream])
    (record,) = sim.records
    assert len(text.split()) == 15 == record.completion_tokens
    assert record.stream is True
    assert stream.finish_reason == "stop"
    assert stream.usage is not None and not stream.usage.estimated
    assert stream.usage.completion_tokens == 15
    assert stream.usage.prompt_tokens == record.prompt_tokens
    assert stream.timings.attempts == 1 and stream.timings.ttft is not None
    assert provider.continuation == ("turns",)


async def test_rate_limit_is_retried_by_us_not_by_litellm(sim: SimServer) -> None:
    fault = {"fault": "rate_limit", "key": "rl", "times": 1, "retry_after": 0}
    async with provider_for(sim) as provider, provider.stream(request(sim=fault)) as stream:
        assert "".join([d.content async for d in stream])
    assert [r.status for r in sim.records] == [429, 200]
    assert stream.timings.attempts == 2
    fault = {"fault": "rate_limit", "retry_after": 0}
    async with provider_for(sim, retry=RetrySettings(max_attempts=2)) as provider:
        with pytest.raises(RateLimitError) as info:
            await read(provider, request(sim=fault))
    assert info.value.provider == "lite"
    assert info.value.status == 429


async def test_errors_are_ours(sim: SimServer) -> None:
    async with provider_for(sim) as provider:
        with pytest.raises(ModelNotFoundError):
            await read(provider, ChatRequest([{"role": "user", "content": "Hi"}], "openai/nope"))
        got: list[str] = []
        with pytest.raises(StreamInterruptedError) as info:
            await read(provider, request(sim={"fault": "reset_mid", "after": 4}), got)
        assert info.value.delivered is True
        assert len(got) >= 1
    await provider.aclose()
    with pytest.raises(ProviderClosedError):
        await read(provider, request())


async def test_leaving_early_disconnects_the_upstream(sim: SimServer) -> None:
    slow = SimModel(name="slow", latency=LatencyProfile.fixed(ttft=0.01, tokens_per_s=20))
    sim.add_model(slow)
    req = ChatRequest([{"role": "user", "content": "Hi"}], "openai/slow")
    async with provider_for(sim) as provider, provider.stream(req) as stream:
        async for delta in stream:
            if delta.content:
                break
    await sim.wait_idle(10)
    assert sim.records[-1].outcome == "client_disconnected"
    assert "litellm" in sys.modules
