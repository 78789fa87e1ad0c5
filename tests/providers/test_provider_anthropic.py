"""AnthropicProvider over real loopback sockets: the request mapping, every event of a Messages
stream, errors before and inside the stream, retries; end to end against the simulator's
``/v1/messages`` route, which the official ``anthropic`` SDK must accept as a server too."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp import web
from support.http import serve_app
from support.providers import SleepRecorder

from moa_stream import (
    ChatRequest,
    ContextLengthError,
    ProtocolError,
    RateLimitError,
    ServerError,
    StreamInterruptedError,
    Usage,
)
from moa_stream.providers import AnthropicProvider, RetrySettings, Timeouts
from moa_stream.sim import LatencyProfile, SimModel, SimServer

FAST = LatencyProfile.fixed(ttft=0.01, tokens_per_s=1000)


def event(name: str, **obj: Any) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps({"type": name, **obj}) + b"\n\n"


def text_delta(text: str, index: int = 0) -> bytes:
    return event("content_block_delta", index=index, delta={"type": "text_delta", "text": text})


def start(input_tokens: int = 10, cache_read: int = 0, cache_creation: int = 0) -> bytes:
    usage = {
        "input_tokens": input_tokens,
        "output_tokens": 1,
        "cache_read_input_tokens": cache_read,
        "cache_creation_input_tokens": cache_creation,
    }
    message = {"id": "msg_1", "type": "message", "role": "assistant", "content": [], "usage": usage}
    return event("message_start", message=message)


def finish(stop: str = "end_turn", output_tokens: int = 2) -> bytes:
    return event(
        "message_delta",
        delta={"stop_reason": stop, "stop_sequence": None},
        usage={"output_tokens": output_tokens},
    ) + event("message_stop")


THINKING_AND_TEXT = (
    start(input_tokens=12, cache_read=100, cache_creation=8)
    + event("content_block_start", index=0, content_block={"type": "thinking", "thinking": ""})
    + event("content_block_delta", index=0, delta={"type": "thinking_delta", "thinking": "Hmm."})
    + event("content_block_delta", index=0, delta={"type": "signature_delta", "signature": "x"})
    + event("content_block_stop", index=0)
    + event("content_block_start", index=1, content_block={"type": "text", "text": ""})
    + event("ping")
    + text_delta("Hello", 1)
    + event("some_future_event", anything=True)
    + text_delta(" world", 1)
    + event("content_block_stop", index=1)
    + finish("max_tokens", 7)
)


HI = ChatRequest([{"role": "user", "content": "x"}], "m")


async def read(
    provider: AnthropicProvider, req: ChatRequest = HI, into: list[str] | None = None
) -> str:
    """The content of a whole stream (kept in ``into`` when it fails part-way)."""
    got = [] if into is None else into
    async with provider.stream(req) as stream:
        async for delta in stream:
            got.append(delta.content)
    return "".join(got)


def provider_for(url: str, **kwargs: Any) -> AnthropicProvider:
    kwargs.setdefault("timeouts", Timeouts(connect=5, first_token=5, idle=5, total=20))
    kwargs.setdefault("retry", RetrySettings(max_attempts=3, jitter=0.0))
    kwargs.setdefault("sleep", SleepRecorder())
    return AnthropicProvider(url, name="claude", **kwargs)


async def test_request_mapping_and_every_event() -> None:
    seen: list[tuple[dict[str, Any], dict[str, str]]] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.append((orjson.loads(await request.read()), dict(request.headers)))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "request-id": "r1"})
        await resp.prepare(request)
        await resp.write(THINKING_AND_TEXT)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/messages", handler)
    async with (
        serve_app(app, shutdown_timeout=0.5) as url,
        provider_for(url, api_key="sk-ant-secret") as provider,
    ):
        req = ChatRequest(
            messages=[
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello "},
            ],
            model="claude-x",
            temperature=0.2,
            max_tokens=50,
            stop=("END",),
            extra={"thinking": {"type": "enabled", "budget_tokens": 1024}},
        )
        async with provider.stream(req) as stream:
            deltas = [d async for d in stream]
    body, headers = seen[0]
    assert body == {
        "model": "claude-x",
        "system": "Be brief.",
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},  # prefill, trailing space removed
        ],
        "max_tokens": 50,
        "stream": True,
        "temperature": 0.2,
        "stop_sequences": ["END"],
        "thinking": {"type": "enabled", "budget_tokens": 1024},
    }
    assert headers["x-api-key"] == "sk-ant-secret"
    assert headers["anthropic-version"] == "2023-06-01"
    assert "Authorization" not in headers
    assert [d.reasoning for d in deltas if d.reasoning] == ["Hmm."]
    assert "".join(d.content for d in deltas) == "Hello world"
    assert all(not (d.content and d.reasoning) for d in deltas), "thinking is never content"
    assert stream.finish_reason == "length"
    assert stream.usage == Usage(120, 7, cached_prompt_tokens=100)
    assert stream.request_id == "r1"
    assert AnthropicProvider.continuation == ("prefill:anthropic", "turns")


def scripted_app(responses: list[Any]) -> tuple[web.Application, list[int]]:
    """Answers request ``i`` with ``responses[i]`` (the last one repeats)."""
    calls: list[int] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        calls.append(len(calls))
        answer = responses[min(len(calls) - 1, len(responses) - 1)]
        if isinstance(answer, web.Response):
            return answer
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(answer)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/messages", handler)
    return app, calls


def overloaded(status: int = 529, retry_after: str | None = None) -> web.Response:
    headers = {"retry-after": retry_after} if retry_after else {}
    body = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    return web.json_response(body, status=status, headers=headers)


async def test_529_and_429_are_retried_with_retry_after() -> None:
    ok = start() + text_delta("ok") + finish()
    rate = web.json_response(
        {"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}},
        status=429,
        headers={"retry-after": "2"},
    )
    app, calls = scripted_app([overloaded(), rate, ok])
    sleep = SleepRecorder()
    async with (
        serve_app(app, shutdown_timeout=0.5) as url,
        provider_for(url, sleep=sleep) as provider,
    ):
        assert await read(provider) == "ok"
    assert len(calls) == 3
    assert sleep.delays[1] == 2.0, "the 429's retry-after was honoured"


async def test_overloaded_error_event_before_text_is_retried_after_text_is_not() -> None:
    error = event("error", error={"type": "overloaded_error", "message": "Overloaded"})
    ok = start() + text_delta("fine") + finish()
    app, calls = scripted_app([start() + error, ok])
    async with serve_app(app, shutdown_timeout=0.5) as url, provider_for(url) as provider:
        assert await read(provider) == "fine"
    assert len(calls) == 2

    app, calls = scripted_app([start() + text_delta("par") + error])
    async with serve_app(app, shutdown_timeout=0.5) as url, provider_for(url) as provider:
        got: list[str] = []
        with pytest.raises(ServerError) as info:
            await read(provider, into=got)
    assert got == ["par"]
    assert info.value.delivered is True
    assert info.value.error_type == "overloaded_error"
    assert len(calls) == 1


async def test_429_asking_too_long_fails_at_once_and_overflow_is_typed() -> None:
    rate = web.json_response(
        {"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}},
        status=429,
        headers={"retry-after": "60"},
    )
    app, calls = scripted_app([rate])
    async with serve_app(app, shutdown_timeout=0.5) as url, provider_for(url) as provider:
        with pytest.raises(RateLimitError) as info:
            await read(provider)
    assert info.value.retry_after == 60
    assert len(calls) == 1
    too_long = web.json_response(
        {
            "type": "error",
            "error": {
                "type": "invalid_request_error",
                "message": "prompt is too long: 9 tokens > 5 maximum",
            },
        },
        status=400,
    )
    app, calls = scripted_app([too_long])
    async with serve_app(app, shutdown_timeout=0.5) as url, provider_for(url) as provider:
        with pytest.raises(ContextLengthError) as overflow:
            await read(provider)
    assert (overflow.value.prompt_tokens, overflow.value.context_window) == (9, 5)
    assert len(calls) == 1


async def test_bad_events_are_protocol_errors() -> None:
    app, _ = scripted_app([start() + b"event: content_block_delta\ndata: {nope\n\n"])
    async with serve_app(app, shutdown_timeout=0.5) as url, provider_for(url) as provider:
        with pytest.raises(ProtocolError):
            await read(provider)


# -- against the simulator -----------------------------------------------------------------------


@pytest.fixture
async def sim() -> AsyncIterator[SimServer]:
    models = [SimModel(name="claude-sim", latency=FAST, answer_tokens=12)]
    async with SimServer(models=models, seed=0) as server:
        yield server


async def test_provider_against_the_simulated_messages_route(sim: SimServer) -> None:
    async with provider_for(sim.url) as provider:
        await provider.prewarm()
        req = ChatRequest(
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
            "claude-sim",
            extra={"thinking": {"type": "enabled", "budget_tokens": 1024}},
        )
        async with provider.stream(req) as stream:
            deltas = [d async for d in stream]
    (record,) = sim.records
    assert record.outcome == "complete"
    text = "".join(d.content for d in deltas)
    assert len(text.split()) == 12 == record.completion_tokens
    assert "".join(d.reasoning for d in deltas) == "Let me think. "
    assert stream.usage is not None and not stream.usage.estimated
    assert stream.usage.prompt_tokens == record.prompt_tokens
    assert stream.finish_reason == "stop"
    assert stream.connection_reused, "prewarm opened the connection the stream used"


@pytest.mark.parametrize(
    ("fault", "error", "requests"),
    [
        ("server_error", None, 2),
        ("rate_limit", None, 2),
        ("error_frame", ServerError, 1),
        ("context_overflow", ContextLengthError, 1),
    ],
)
async def test_simulated_faults(
    sim: SimServer, fault: str, error: type[Exception] | None, requests: int
) -> None:
    sim_field: dict[str, Any] = {"fault": fault, "key": fault, "times": 1, "retry_after": 0}
    if fault == "error_frame":
        sim_field = {"fault": fault, "after": 3}
    req = ChatRequest([{"role": "user", "content": "Hi"}], "claude-sim", extra={"sim": sim_field})
    async with provider_for(sim.url) as provider:
        if error is None:
            assert await read(provider, req)
        else:
            with pytest.raises(error):
                await read(provider, req)
    assert len(sim.records) == requests


async def test_the_official_sdk_accepts_the_simulator(sim: SimServer) -> None:
    anthropic = pytest.importorskip("anthropic")
    client = anthropic.AsyncAnthropic(base_url=sim.url, api_key="sk-ant-test", max_retries=0)
    async with client:
        async with client.messages.stream(
            model="claude-sim",
            max_tokens=64,
            system="Be brief.",
            messages=[{"role": "user", "content": "Hi"}],
            thinking={"type": "enabled", "budget_tokens": 1024},
        ) as stream:
            texts = [t async for t in stream.text_stream]
            final = await stream.get_final_message()
        assert len("".join(texts).split()) == 12
        assert final.stop_reason == "end_turn"
        assert [b.type for b in final.content] == ["thinking", "text"]
        assert final.usage.output_tokens >= 12
        assert final.usage.input_tokens == sim.records[0].prompt_tokens
        message = await client.messages.create(
            model="claude-sim", max_tokens=64, messages=[{"role": "user", "content": "Hi"}]
        )
        assert message.content[0].type == "text"
        with pytest.raises(anthropic.InternalServerError) as info:
            await client.messages.create(
                model="claude-sim",
                max_tokens=64,
                messages=[{"role": "user", "content": "Hi"}],
                extra_body={"sim": {"fault": "server_error"}},
            )
        assert info.value.status_code == 529
        with pytest.raises(anthropic.NotFoundError):
            await client.messages.create(
                model="nope", max_tokens=8, messages=[{"role": "user", "content": "Hi"}]
            )


async def test_leaving_early_disconnects_and_faults_mid_stream(sim: SimServer) -> None:
    slow = SimModel(name="slow", latency=LatencyProfile.fixed(ttft=0.01, tokens_per_s=20))
    sim.add_model(slow)
    async with (
        provider_for(sim.url) as provider,
        provider.stream(ChatRequest([{"role": "user", "content": "Hi"}], "slow")) as stream,
    ):
        async for delta in stream:
            if delta.content:
                break
    await sim.wait_idle(10)
    assert sim.records[-1].outcome == "client_disconnected"

    keepalive = ChatRequest(
        [{"role": "user", "content": "Hi"}], "claude-sim", extra={"sim": {"fault": "keepalive"}}
    )
    reset = ChatRequest(
        [{"role": "user", "content": "Hi"}],
        "claude-sim",
        extra={"sim": {"fault": "reset_mid", "after": 3}},
    )
    malformed = ChatRequest(
        [{"role": "user", "content": "Hi"}],
        "claude-sim",
        extra={"sim": {"fault": "malformed", "after": 3}},
    )
    async with provider_for(sim.url) as provider:
        assert len((await read(provider, keepalive)).split()) == 12
        got: list[str] = []
        with pytest.raises(StreamInterruptedError) as info:
            await read(provider, reset, got)
        assert info.value.delivered and "".join(got)
        with pytest.raises(ProtocolError):
            await read(provider, malformed)


async def test_a_staircase_marks_its_stable_prefix_for_the_prompt_cache() -> None:
    """Every step request of a staircase carries ``cache_prefix``: its last user message goes
    as one content block per paragraph, the last one a ``cache_control`` breakpoint, so the
    previous step's breakpoint is a block boundary of the next request."""
    from moa_stream.engine import Agent, Partial, moa
    from moa_stream.engine.staircase import Continuation, Staircase

    bodies: list[dict[str, Any]] = []
    models = [
        SimModel(name=n, latency=LatencyProfile.fixed(ttft=0.01, tokens_per_s=tps), answer_tokens=k)
        for n, tps, k in (("p1", 400.0, 80), ("p2", 200.0, 80), ("agg", 2000.0, 160))
    ]
    async with (
        SimServer(models=models, seed=3) as sim,
        provider_for(sim.base_url.removesuffix("/v1")) as provider,
    ):
        original = provider._encode

        def spy(request: ChatRequest) -> bytes:
            data = original(request)
            bodies.append(orjson.loads(data))
            return data

        provider._encode = spy  # type: ignore[method-assign]
        spec = moa(
            [Agent("p1", provider, "p1"), Agent("p2", provider, "p2")],
            Agent("agg", provider, "agg"),
            policy=Partial(1, min_tokens=4),
            staircase=Staircase(
                steps=(8,), lead=4, min_news=1, default=Continuation("prefill", "anthropic")
            ),
        )
        async with spec.stream([{"role": "user", "content": "Why is the sky blue?"}]) as run:
            answer = "".join([t async for t in run.text()])
    assert answer.strip()
    proposers = [b for b in bodies if b["model"] != "agg"]
    steps = [b for b in bodies if b["model"] == "agg"]
    assert len(steps) >= 2
    assert all(isinstance(b["messages"][0]["content"], str) for b in proposers)  # not marked
    texts = []
    for body in steps:
        user = body["messages"][0]
        blocks = user["content"]
        assert [b.get("cache_control") for b in blocks][-1] == {"type": "ephemeral"}
        assert all("cache_control" not in b for b in blocks[:-1])
        texts.append([b["text"] for b in blocks])
    # each step's user message extends the previous one by whole blocks: the previous
    # breakpoint is a block boundary of the next request
    for before, after in itertools.pairwise(texts):
        assert after[: len(before)] == before
    assert len(texts[-1]) > len(texts[0])
