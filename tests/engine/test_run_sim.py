"""The engine over real HTTP: OpenAIProvider against the simulated upstream on loopback.

Latencies are fixed (no randomness) so the schedule is known; assertions on time compare with
margins of hundreds of milliseconds, never exact figures.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from moa_stream import AggregatorError, OpenAIProvider, RetryPolicy
from moa_stream.engine import Agent, MoA, Partial, Quorum, moa
from moa_stream.sim import FaultProfile, LatencyProfile, SimModel, SimServer
from moa_stream.sim.quiz import get_question, score

QUESTION = get_question("Q3")
USER = [{"role": "user", "content": QUESTION.prompt}]


def model(name: str, ttft: float, tokens: int = 20, tps: float = 400.0, **kw) -> SimModel:
    return SimModel(
        name=name,
        latency=LatencyProfile.fixed(ttft=ttft, tokens_per_s=tps),
        answer_tokens=tokens,
        **kw,
    )


MODELS = [
    model("fast-a", 0.05, accuracy=1.0),
    model("fast-b", 0.08, accuracy=1.0),
    model("slow", 1.2, accuracy=1.0),
    model("agg", 0.05, tokens=30, accuracy=1.0),
    model("broken", 0.05, faults=FaultProfile(server_error=1.0)),
    model("long", 0.02, tokens=2000, tps=100.0),
]


@pytest.fixture
async def sim() -> AsyncIterator[SimServer]:
    async with SimServer(models=MODELS, seed=1) as server:
        yield server


@pytest.fixture
async def provider(sim: SimServer) -> AsyncIterator[OpenAIProvider]:
    async with OpenAIProvider(sim.base_url, name="sim", retry=RetryPolicy(max_attempts=1)) as p:
        yield p


def agents(p: OpenAIProvider, *names: str) -> list[Agent]:
    return [Agent(n, p, n) for n in names]


async def test_quorum_beats_wait_all_by_about_the_gap_the_profiles_imply(
    provider: OpenAIProvider,
) -> None:
    proposers = agents(provider, "fast-a", "fast-b", "slow")
    aggregator = Agent("agg", provider, "agg")
    wait_all = await moa(proposers, aggregator).stream(USER).final()
    quorum = await moa(proposers, aggregator, policy=Quorum(2)).stream(USER).final()
    # The slow proposer finishes ~1.2 + 20/400 s in; the second fast one ~0.08 + 20/400 s.
    gap = wait_all.report.ttft_s - quorum.report.ttft_s
    assert 0.8 < gap < 1.6
    assert quorum.report.layers[0].reason == "quorum"
    assert score(wait_all.text, QUESTION) and score(quorum.text, QUESTION)


async def test_the_aggregator_sees_the_proposers_answers_over_http(
    sim: SimServer, provider: OpenAIProvider
) -> None:
    result = (
        await moa(agents(provider, "fast-a", "fast-b"), Agent("agg", provider, "agg"))
        .stream(USER)
        .final()
    )
    proposer_answers = [
        e for e in result.report.agents if e.role == "proposer" and e.status == "complete"
    ]
    assert len(proposer_answers) == 2
    agg_record = next(r for r in sim.records if r.model == "agg")
    assert agg_record.answer == QUESTION.answer
    assert result.report.usage.prompt_tokens > 0 and not result.report.usage.estimated


async def test_each_report_entry_names_the_upstream_request_it_made(
    sim: SimServer, provider: OpenAIProvider
) -> None:
    result = (
        await moa(agents(provider, "fast-a", "fast-b"), Agent("agg", provider, "agg"))
        .stream(USER)
        .final()
    )
    await sim.wait_idle(timeout=5.0)
    models = {r.request_id: r.model for r in sim.records}
    assert len(models) == 3
    assert {a.request_id: a.model for a in result.report.agents} == models


async def test_a_failing_proposer_over_http_is_reported_with_its_kind(
    provider: OpenAIProvider,
) -> None:
    spec = moa(agents(provider, "fast-a", "broken"), Agent("agg", provider, "agg"))
    async with spec.stream(USER) as run:
        events = [e async for e in run.events()]
    failed = [e for e in events if e.type == "proposer.failed"]
    assert [(e.agent, e.kind) for e in failed] == [("broken", "server")]
    assert score(run.report.text, QUESTION)


async def test_aggregator_fallback_over_http(provider: OpenAIProvider) -> None:
    spec = MoA(
        layers=moa(agents(provider, "fast-a"), Agent("agg", provider, "agg")).layers,
        aggregator=Agent("broken", provider, "broken"),
        fallbacks=(Agent("agg", provider, "agg"),),
    )
    result = await spec.stream(USER).final()
    assert result.report.aggregator == "agg"
    with pytest.raises(AggregatorError):
        await (
            MoA(layers=spec.layers, aggregator=Agent("broken", provider, "broken"))
            .stream(USER)
            .final()
        )


async def test_leaving_early_closes_every_upstream_connection(
    sim: SimServer, provider: OpenAIProvider
) -> None:
    spec = moa(
        agents(provider, "long", "slow"), Agent("agg", provider, "long"), policy=Partial(1, 5)
    )
    async with spec.stream(USER) as run:
        async for _text in run.text():
            break
    await sim.wait_idle(timeout=5.0)
    assert sim.active_streams == 0
    outcomes = {r.model: r.outcome for r in sim.records}
    assert outcomes["slow"] == "client_disconnected"
    assert all(r.outcome in ("complete", "client_disconnected") for r in sim.records)
    assert sum(r.outcome == "client_disconnected" for r in sim.records) >= 2


async def test_cancelling_the_consumer_closes_every_upstream_connection(
    sim: SimServer, provider: OpenAIProvider
) -> None:
    spec = moa(agents(provider, "long", "slow"), Agent("agg", provider, "agg"))

    async def consume() -> None:
        async with spec.stream(USER) as run:
            async for _ in run.events():
                pass

    task = asyncio.create_task(consume())
    for _ in range(200):
        if sim.active_streams == 2:
            break
        await asyncio.sleep(0.01)
    assert sim.active_streams == 2
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await sim.wait_idle(timeout=5.0)
    assert sim.active_streams == 0
    assert {r.outcome for r in sim.records} == {"client_disconnected"}


async def test_a_progress_client_that_hangs_up_cancels_the_upstream_proposers_at_once(
    sim: SimServer, provider: OpenAIProvider
) -> None:
    """Through the server: a client that asked for progress and left after the first progress
    line must not leave the proposers streaming (and billed) to their end."""
    import aiohttp
    from aiohttp import web

    from moa_stream.config import ServerConfig
    from moa_stream.server import PROGRESS_HEADER
    from moa_stream.server.app import MoAServer, build_app

    spec = moa(
        [Agent("l1", provider, "long"), Agent("l2", provider, "long")],
        Agent("agg", provider, "agg"),
    )
    app = build_app(MoAServer({"m": spec}, ServerConfig()))
    runner = web.AppRunner(app)
    await runner.setup()
    cleaned = False
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1/chat/completions"
        body = {"model": "m", "messages": USER, "stream": True}
        headers = {PROGRESS_HEADER: "1"}
        async with (
            aiohttp.ClientSession() as session,
            session.post(url, json=body, headers=headers) as resp,
        ):
            assert resp.status == 200
            while sim.active_streams < 2:  # progress lines until both proposers stream
                await resp.content.readline()
            # ... then hang up.
        # The proposers would stream for 20 s. The server notices at its next progress write;
        # its handler (and so the run's clean-up) must then end at once.
        async with asyncio.timeout(8):
            await runner.cleanup()
        cleaned = True
        assert all(r.completion_tokens < 2000 for r in sim.records if r.model == "long")
    finally:
        if not cleaned:
            await runner.cleanup()
