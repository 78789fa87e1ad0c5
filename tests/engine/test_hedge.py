"""Hedged requests, per-agent timeouts, per-layer max_tokens and per-request policies.

Hedging runs over real HTTP against the simulated upstream with a slow/fast pair of models of
fixed latency; assertions compare orderings and use margins of hundreds of milliseconds.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from moa_stream import ConfigError, OpenAIProvider, RetryPolicy
from moa_stream.engine import Agent, Hedge, Layer, MoA, Quorum, moa, single
from moa_stream.sim import LatencyProfile, SimModel, SimServer
from moa_stream.testing import Script, ScriptedProvider, collect_events

USER = [{"role": "user", "content": "What is 2 + 2?"}]


def model(name: str, ttft: float, tokens: int = 12) -> SimModel:
    return SimModel(
        name=name,
        latency=LatencyProfile.fixed(ttft=ttft, tokens_per_s=400.0),
        answer_tokens=tokens,
    )


@pytest.fixture
async def sim() -> AsyncIterator[SimServer]:
    models = [model("slow", 3.0), model("mid", 0.5), model("fast", 0.05), model("agg", 0.05)]
    async with SimServer(models=models, seed=1) as server:
        yield server


@pytest.fixture
async def provider(sim: SimServer) -> AsyncIterator[OpenAIProvider]:
    async with OpenAIProvider(sim.base_url, name="sim", retry=RetryPolicy(max_attempts=1)) as p:
        yield p


async def test_a_slow_aggregator_is_hedged_to_the_fast_backup(
    provider: OpenAIProvider, sim: SimServer
) -> None:
    hedge = Hedge(backup=Agent("fast", provider, "fast"), after=0.2, budget=1.0)
    spec = single(Agent("slow", provider, "slow", hedge=hedge))
    events = await collect_events(spec.stream(USER))
    report = events[-1].report
    hedged = [e for e in events if e.type == "hedge"]
    assert len(hedged) == 1 and hedged[0].winner == "backup" and hedged[0].role == "aggregator"
    assert hedged[0].backup == "sim/fast"
    assert report.hedges == 1
    assert report.agents[0].hedge is not None and report.agents[0].hedge.winner == "backup"
    assert report.ttft_s is not None and report.ttft_s < 2.0, "did not wait for the slow copy"
    assert report.text
    assert hedge.requests == 1 and hedge.hedges == 1
    assert [r.model for r in sim.records] == ["slow", "fast"]
    assert sim.records[0].outcome != "complete", "the losing copy was closed"
    assert report.agents[0].request_id == sim.records[1].request_id, "the winner's request"


async def test_an_agent_with_timeouts_still_reports_its_upstream_request_id(
    provider: OpenAIProvider, sim: SimServer
) -> None:
    spec = single(Agent("fast", provider, "fast", first_token_timeout=30.0, timeout=60.0))
    result = await spec.stream(USER).final()
    (record,) = sim.records
    assert result.report.agents[0].request_id == record.request_id


async def test_a_slow_proposer_is_hedged_and_its_answer_used(provider: OpenAIProvider) -> None:
    hedge = Hedge(backup=Agent("fast", provider, "fast"), after=0.2, budget=1.0)
    spec = moa(
        [Agent("slow", provider, "slow", hedge=hedge), Agent("fast", provider, "fast")],
        Agent("agg", provider, "agg"),
    )
    events = await collect_events(spec.stream(USER))
    hedged = [e for e in events if e.type == "hedge"]
    assert [(e.role, e.agent, e.winner) for e in hedged] == [("proposer", "slow", "backup")]
    layer = next(e for e in events if e.type == "layer.done")
    assert [r.status for r in layer.references] == ["complete", "complete"]
    assert events[-1].report.ttft_s < 2.0


async def test_the_budget_caps_the_extra_requests(provider: OpenAIProvider, sim: SimServer) -> None:
    hedge = Hedge(backup=Agent("fast", provider, "fast"), after=0.05, budget=0.5)
    spec = single(Agent("mid", provider, "mid", hedge=hedge))
    reports = [(await spec.stream(USER).final()).report for _ in range(4)]
    # Every request is slow enough to hedge; half a hedge per request allows the 2nd and 4th.
    assert [r.hedges for r in reports] == [0, 1, 0, 1]
    assert (hedge.requests, hedge.hedges) == (4, 2)
    assert sorted(r.model for r in sim.records) == ["fast", "fast", "mid", "mid", "mid", "mid"]


def test_the_threshold_follows_the_agents_recent_times_to_first_token() -> None:
    p = ScriptedProvider({})
    hedge = Hedge(backup=Agent("b", p, "b"), after=1.0, percentile=90, min_samples=10)
    assert hedge.threshold() == 1.0, "after, until enough samples"
    for i in range(100):
        hedge._book.ttfts.append(i / 100)
    assert hedge.threshold() == pytest.approx(0.9)


def test_hedge_settings_are_checked() -> None:
    with pytest.raises(ConfigError):
        Hedge()
    with pytest.raises(ConfigError):
        Hedge(after=0.1, budget=2.0)
    with pytest.raises(ConfigError):
        Hedge(percentile=100)


async def test_a_proposer_slower_than_its_agent_timeout_fails_and_the_layer_goes_on() -> None:
    p = ScriptedProvider(
        {"ok": Script(["4"]), "slow": Script(["late"], ttft=30.0), "agg": Script(["x"])}
    )
    spec = moa(
        [Agent("ok", p, "ok"), Agent("slow", p, "slow", first_token_timeout=0.1)],
        Agent("agg", p, "agg"),
    )
    events = await collect_events(spec.stream(USER))
    failed = [e for e in events if e.type == "proposer.failed"]
    assert [(e.agent, e.kind) for e in failed] == [("slow", "first_token_timeout")]
    assert events[-1].type == "run.done"
    assert p.open_streams == 0


async def test_an_aggregator_slower_than_its_first_token_timeout_falls_back() -> None:
    p = ScriptedProvider(
        {
            "a": Script(["4"]),
            "agg": Script(["x"], ttft=30.0),
            "backup": Script(["y"]),
        }
    )
    spec = MoA(
        layers=(Layer((Agent("a", p, "a"),)),),
        aggregator=Agent("agg", p, "agg", first_token_timeout=0.1),
        fallbacks=(Agent("backup", p, "backup"),),
    )
    events = await collect_events(spec.stream(USER))
    failed = [e for e in events if e.type == "aggregator.failed"]
    assert [e.kind for e in failed] == ["first_token_timeout"]
    assert events[-1].report.text == "y"


async def test_an_agents_total_timeout_cuts_a_long_answer() -> None:
    p = ScriptedProvider(
        {"a": Script(["a "] * 100, ttft=0.01, interval=0.02), "agg": Script(["x"])}
    )
    spec = moa([Agent("a", p, "a", timeout=0.1)], Agent("agg", p, "agg"))
    events = await collect_events(spec.stream(USER))
    failed = [e for e in events if e.type == "proposer.failed"]
    assert [e.kind for e in failed] == ["total_timeout"]
    assert p.open_streams == 0


async def test_layer_max_tokens_bounds_proposers_and_stream_overrides_only_the_answer() -> None:
    p = ScriptedProvider({"a": Script(["4"]), "agg": Script(["x"])})
    spec = MoA(
        layers=(Layer((Agent("a", p, "a", max_tokens=900),), max_tokens=64),),
        aggregator=Agent("agg", p, "agg"),
    )
    await spec.stream(USER, max_tokens=7, temperature=0.3).final()
    proposer, aggregator = p.requests
    assert (proposer.max_tokens, proposer.temperature) == (64, None)
    assert (aggregator.max_tokens, aggregator.temperature) == (7, 0.3)


async def test_a_policy_given_to_stream_applies_to_that_run_only() -> None:
    p = ScriptedProvider(
        {"fast": Script(["4"]), "slow": Script(["4"], ttft=30.0), "agg": Script(["x"])}
    )
    spec = moa([Agent("fast", p, "fast"), Agent("slow", p, "slow")], Agent("agg", p, "agg"))
    result = await spec.stream(USER, policy="quorum(1)").final()
    assert result.report.layers[0].reason == "quorum"
    assert repr(spec.layers[0].policy) == "wait_all"
    with pytest.raises(ConfigError):
        spec.stream(USER, policy=Quorum(3))
