"""The short public API: ``MoA.from_endpoints`` owns its providers, ``text()`` closes its run,
policies as text, ``Agent.of``, ``mixture_of_agents``, and runs consumed outside ``async with``
refused."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest

import moa_stream
from moa_stream import Agent, ChatRequest, ConfigError, Endpoint, OpenAIProvider, Quorum
from moa_stream.sim import LatencyProfile, SimModel, SimServer


def model(name: str, ttft: float, tokens: int = 20) -> SimModel:
    return SimModel(
        name=name,
        latency=LatencyProfile.fixed(ttft=ttft, tokens_per_s=400.0),
        answer_tokens=tokens,
    )


MODELS = [model("fast-a", 0.02), model("fast-b", 0.04), model("slow", 3.0), model("agg", 0.02)]
USER = [{"role": "user", "content": "Why is the sky blue?"}]


async def _read_all(provider: OpenAIProvider, request: ChatRequest) -> None:
    async with provider.stream(request) as stream:
        async for _ in stream:
            pass


@pytest.fixture
async def sim() -> AsyncIterator[SimServer]:
    async with SimServer(models=MODELS, seed=1) as server:
        yield server


async def test_the_ten_line_program_streams_an_answer_and_closes_everything(
    sim: SimServer,
) -> None:
    pieces = []
    async with moa_stream.MoA.from_endpoints(
        ["fast-a", "fast-b", "slow"], "agg", base_url=sim.base_url
    ) as m:
        async for text in m.text(USER, policy="quorum(2)"):
            pieces.append(text)
        providers = m.providers
    assert "".join(pieces).strip()
    # quorum(2) did not wait for the slow proposer (3 s), and its request was closed.
    await sim.wait_idle(5)
    assert sim.active_streams == 0
    assert len(providers) == 1, "three models at one endpoint share one provider"
    with pytest.raises(moa_stream.MoAStreamError):  # the provider is closed
        await _read_all(providers[0], ChatRequest(messages=USER, model="agg"))
    with pytest.raises(RuntimeError, match="closed"):
        m.stream(USER)


async def test_policy_text_is_parsed_and_a_bad_one_is_a_config_error(sim: SimServer) -> None:
    async with moa_stream.from_endpoints(["fast-a", "fast-b"], "agg", base_url=sim.base_url) as m:
        result = await m.final(USER, policy="quorum(1)")
        refs = result.report.layers[0].references
        assert [r.agent for r in refs] == ["fast-a"], "quorum(1) moves on after the first"
        with pytest.raises(ConfigError, match="policy"):
            await m.final(USER, policy="quorum(")


async def test_the_block_closes_runs_left_open_before_its_providers(sim: SimServer) -> None:
    async with moa_stream.from_endpoints(["slow", "fast-a"], "agg", base_url=sim.base_url) as m:
        run = m.stream(USER)
        await run.__aenter__()  # a run its caller never closed
    await sim.wait_idle(5)
    assert sim.active_streams == 0
    # Closed, not abandoned: no request of the run is still counted as running.
    assert {a.agent for a in run.report.agents} == {"slow", "fast-a"}
    assert all(a.status != "partial" for a in run.report.agents)


async def test_leaving_text_early_closes_its_run(sim: SimServer) -> None:
    # The aggregator's answer would take 100 s: if it ends while the providers are still
    # open, leaving the text closed it, whatever the load on the machine.
    long_answer = [
        model("fast-a", 0.02),
        SimModel(
            name="agg",
            latency=LatencyProfile.fixed(ttft=0.02, tokens_per_s=20.0),
            answer_tokens=2000,
        ),
    ]
    async with SimServer(models=long_answer, seed=1) as server:
        m = moa_stream.from_endpoints(["fast-a"], "agg", base_url=server.base_url)
        async with m:
            async with contextlib.aclosing(m.text(USER)) as pieces:
                async for _ in pieces:
                    break
            # Closed at once, not when the providers close: the aggregator's stream is gone.
            await server.wait_idle(30)
            assert server.active_streams == 0
            (agg,) = [r for r in server.records if r.model == "agg"]
            assert agg.outcome == "client_disconnected"


async def test_endpoints_with_their_own_url_get_their_own_provider(sim: SimServer) -> None:
    m = moa_stream.MoA.from_endpoints(
        [Endpoint("fast-a", base_url=sim.base_url), Endpoint("fast-a", name="again")],
        Endpoint("agg", params={"temperature": 0.1}),
        base_url=sim.base_url + "/",
    )
    async with m:
        assert [a.name for a in m.spec.layers[0].agents] == ["fast-a", "again"]
        assert m.spec.aggregator.temperature == 0.1
        assert len(m.providers) == 2
        result = await m.final(USER)
        assert result.text


def test_a_model_without_a_url_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="base_url"):
        moa_stream.from_endpoints(["a"], "b")


async def test_agent_of_names_the_agent_after_its_model_and_mixture_is_moa(
    sim: SimServer,
) -> None:
    async with OpenAIProvider(sim.base_url) as p:
        a = Agent.of(p, "fast-a", temperature=0.2)
        assert (a.name, a.model, a.temperature) == ("fast-a", "fast-a", 0.2)
        assert Agent.of(p, "fast-a", name="first").name == "first"
        spec = moa_stream.mixture_of_agents([a, Agent.of(p, "fast-b")], Agent.of(p, "agg"))
        assert spec == moa_stream.moa([a, Agent.of(p, "fast-b")], Agent.of(p, "agg"))
        result = await spec.with_policy(Quorum(1)).stream(USER).final()
        assert result.text


async def test_events_outside_async_with_raise_a_clear_error(sim: SimServer) -> None:
    async with OpenAIProvider(sim.base_url) as p:
        run = moa_stream.moa([Agent.of(p, "fast-a")], Agent.of(p, "agg")).stream(USER)
        with pytest.raises(RuntimeError, match="async with"):
            run.events()
        with pytest.raises(RuntimeError, match="async with"):
            async for _ in run.text():
                pass
        await run.aclose()


def test_event_classes_are_exported() -> None:
    for name in ("ProposerStarted", "ProposerDelta", "LayerDone", "AggregatorDelta", "RunDone"):
        assert getattr(moa_stream, name).__name__ == name
