"""The run's behaviour with scripted providers: ordering, policies, failures, cancellation.

Scripted streams sleep on the real clock; assertions on time use wide margins and compare
orderings, never exact durations.
"""

from __future__ import annotations

import asyncio

import pytest

from moa_stream import AggregatorError, LayerFailedError, RateLimitError, ServerError
from moa_stream.engine import (
    Agent,
    Deadline,
    LayerCut,
    MoA,
    Partial,
    Quorum,
    moa,
    self_moa,
    single,
)
from moa_stream.testing import Script, ScriptedProvider, collect_events

USER = [{"role": "user", "content": "What is 2 + 2?"}]


def provider(**scripts: Script) -> ScriptedProvider:
    return ScriptedProvider(dict(scripts))


def agents(p: ScriptedProvider, *models: str) -> list[Agent]:
    return [Agent(m, p, m) for m in models]


def three_proposers(slow_ttft: float = 1.5) -> ScriptedProvider:
    return provider(
        fast=Script(["f1 ", "f2"], ttft=0.02),
        mid=Script(["m1 ", "m2"], ttft=0.05),
        slow=Script(["s1 ", "s2"], ttft=slow_ttft),
        agg=Script(["The ", "answer ", "is 4."], ttft=0.01),
    )


async def test_events_come_in_order_and_the_answer_is_the_aggregator_text() -> None:
    p = three_proposers(slow_ttft=0.08)
    events = await collect_events(
        moa(agents(p, "fast", "mid", "slow"), Agent("agg", p, "agg")).stream(USER)
    )
    types = [e.type for e in events]
    assert types[:3] == ["proposer.started"] * 3
    assert types.index("layer.done") < types.index("aggregator.started")
    assert types[-2:] == ["aggregator.done", "run.done"]
    assert sum(t == "proposer.done" for t in types) == 3
    text = "".join(e.text for e in events if e.type == "aggregator.delta")
    report = events[-1].report
    assert text == report.text == "The answer is 4."
    assert report.layers[0].reason == "all"
    assert [r.status for r in report.layers[0].references] == ["complete"] * 3
    assert report.ttft_s is not None and report.ttft_s <= report.total_s
    assert report.usage.completion_tokens == 2 + 2 + 2 + 3
    assert p.open_streams == 0


async def test_quorum_starts_the_aggregator_before_the_straggler_and_cancels_it() -> None:
    p = three_proposers(slow_ttft=5.0)
    run = moa(agents(p, "fast", "mid", "slow"), Agent("agg", p, "agg"), policy=Quorum(2)).stream(
        USER
    )
    async with run:
        result = await run.final()
    report = result.report
    assert report.layers[0].reason == "quorum"
    assert report.ttft_s is not None and report.ttft_s < 2.0, "did not wait for the 5 s straggler"
    slow = next(a for a in report.agents if a.agent == "slow")
    assert slow.status == "cancelled"
    assert p.opened == p.closed == 4
    assert "s1" not in p.requests[-1].messages[-1]["content"]


async def test_wait_all_waits_for_the_slowest_proposer() -> None:
    fast = (
        await moa(
            agents(p1 := three_proposers(0.6), "fast", "mid", "slow"),
            Agent("agg", p1, "agg"),
            policy=Quorum(1),
        )
        .stream(USER)
        .final()
    )
    slow = (
        await moa(
            agents(p2 := three_proposers(0.6), "fast", "mid", "slow"), Agent("agg", p2, "agg")
        )
        .stream(USER)
        .final()
    )
    assert slow.report.ttft_s >= 0.6
    assert fast.report.ttft_s < slow.report.ttft_s - 0.3


async def test_kept_stragglers_finish_for_accounting() -> None:
    p = three_proposers(slow_ttft=0.3)
    spec = moa(
        agents(p, "fast", "mid", "slow"),
        Agent("agg", p, "agg"),
        policy=Quorum(2),
        stragglers="keep",
    )
    run = spec.stream(USER)
    async with run:
        async for _ in run.text():
            pass
        assert [r.agent for r in run.report.layers[0].references] == ["fast", "mid"]
    slow = next(a for a in run.report.agents if a.agent == "slow")
    assert slow.status == "complete", "kept straggler ran to its end before the run closed"
    assert p.open_streams == 0


async def test_a_failed_proposer_is_an_event_and_the_layer_goes_on() -> None:
    p = provider(
        ok1=Script(["a"], ttft=0.01),
        ok2=Script(["b"], ttft=0.02),
        bad=Script(["x"], error=ServerError("boom", status=500), fail_after=0),
        agg=Script(["done"]),
    )
    events = await collect_events(
        moa(agents(p, "ok1", "bad", "ok2"), Agent("agg", p, "agg"), policy=Quorum(2)).stream(USER)
    )
    failed = [e for e in events if e.type == "proposer.failed"]
    assert len(failed) == 1 and failed[0].agent == "bad" and failed[0].kind == "server"
    layer = next(e for e in events if e.type == "layer.done")
    assert [r.status for r in layer.references] == ["complete", "failed", "complete"]
    prompt = p.requests[-1].messages[-1]["content"]
    assert 'status="failed, no response"' in prompt


async def test_unreachable_policy_degrades_by_default_and_raises_when_asked() -> None:
    def failing() -> ScriptedProvider:
        return provider(
            ok=Script(["a"], ttft=0.01),
            bad1=Script([], error=ServerError("boom", status=503)),
            bad2=Script([], error=ServerError("boom", status=503)),
            agg=Script(["fine"]),
        )

    p = failing()
    result = (
        await moa(agents(p, "ok", "bad1", "bad2"), Agent("agg", p, "agg"), policy=Quorum(2))
        .stream(USER)
        .final()
    )
    assert result.report.layers[0].reason == "degraded"
    assert result.text == "fine"

    p = failing()
    spec = moa(
        agents(p, "ok", "bad1", "bad2"), Agent("agg", p, "agg"), policy=Quorum(2), on_unmet="raise"
    )
    with pytest.raises(LayerFailedError) as info:
        await spec.stream(USER).final()
    assert set(info.value.errors) == {"bad1", "bad2"}
    assert p.open_streams == 0


async def test_aggregator_falls_back_before_its_first_token() -> None:
    p = provider(
        a=Script(["ref"]),
        agg=Script([], error=RateLimitError("slow down", status=429)),
        backup=Script(["from ", "backup"]),
    )
    spec = MoA(
        layers=moa(agents(p, "a"), Agent("agg", p, "agg")).layers,
        aggregator=Agent("agg", p, "agg"),
        fallbacks=(Agent("backup", p, "backup"),),
    )
    events = await collect_events(spec.stream(USER))
    types = [e.type for e in events]
    assert types.count("aggregator.started") == 2
    assert "aggregator.failed" in types
    assert events[-1].report.text == "from backup"
    assert events[-1].report.aggregator == "backup"


async def test_aggregator_failure_after_first_token_raises_with_the_partial_answer() -> None:
    p = provider(
        a=Script(["ref"]),
        agg=Script(["half ", "an ", "answer"], error=ServerError("gone", status=502), fail_after=2),
        backup=Script(["never"]),
    )
    spec = MoA(
        layers=moa(agents(p, "a"), Agent("agg", p, "agg")).layers,
        aggregator=Agent("agg", p, "agg"),
        fallbacks=(Agent("backup", p, "backup"),),
    )
    run = spec.stream(USER)
    with pytest.raises(AggregatorError) as info:
        await run.final()
    assert info.value.partial_text == "half an "
    assert run.report.text == "half an "
    assert run.report.error is not None
    assert all(r.model != "backup" for r in p.requests), "no fallback after tokens were shown"


async def test_every_aggregator_failing_before_its_first_token_raises() -> None:
    p = provider(
        a=Script(["ref"]),
        agg=Script([], error=RateLimitError("slow down", status=429)),
        backup=Script([], error=ServerError("down", status=503)),
    )
    spec = MoA(
        layers=moa(agents(p, "a"), Agent("agg", p, "agg")).layers,
        aggregator=Agent("agg", p, "agg"),
        fallbacks=(Agent("backup", p, "backup"),),
    )
    run = spec.stream(USER)
    seen: list[tuple[str, int, str]] = []

    async def consume() -> None:
        async with run:
            async for event in run.events():
                if event.type in ("aggregator.started", "aggregator.failed"):
                    seen.append((event.type, event.attempt, event.agent))

    with pytest.raises(AggregatorError, match="every aggregator failed before answering") as info:
        await consume()
    assert seen == [
        ("aggregator.started", 0, "agg"),
        ("aggregator.failed", 0, "agg"),
        ("aggregator.started", 1, "backup"),
        ("aggregator.failed", 1, "backup"),
    ]
    assert list(info.value.errors) == ["agg", "backup"]
    assert run.report.aggregator is None
    assert [a.status for a in run.report.agents if a.role == "aggregator"] == ["failed", "failed"]


async def test_leaving_early_closes_every_stream() -> None:
    p = provider(
        a=Script(["x "] * 50, ttft=0.01, interval=0.01),
        b=Script(["y "] * 50, ttft=2.0),
        agg=Script(["tok "] * 100, ttft=0.01, interval=0.01),
    )
    run = moa(agents(p, "a", "b"), Agent("agg", p, "agg"), policy=Quorum(1)).stream(USER)
    async with run:
        async for _text in run.text():
            break
    assert p.opened == 3 and p.open_streams == 0


async def test_cancelling_the_consumer_closes_every_stream() -> None:
    p = provider(
        a=Script(["x "] * 100, ttft=0.01, interval=0.05),
        b=Script(["y "] * 100, ttft=0.01, interval=0.05),
        agg=Script(["z"]),
    )

    async def consume() -> None:
        async with moa(agents(p, "a", "b"), Agent("agg", p, "agg")).stream(USER) as run:
            async for _ in run.events():
                pass

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.2)
    assert p.open_streams == 2
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert p.open_streams == 0


async def test_agreement_cuts_the_remaining_layers() -> None:
    p = provider(
        a=Script(["the answer is 4"]),
        b=Script(["The answer is 4."]),
        agg=Script(["4"]),
    )
    spec = moa(agents(p, "a", "b"), Agent("agg", p, "agg"), layers=3, cut=LayerCut(agreement=0.9))
    result = await spec.stream(USER).final()
    assert len(result.report.layers) == 1
    assert result.report.layers[0].cut == "agreement"
    assert result.report.layers[0].agreement == pytest.approx(1.0)
    assert len(p.requests) == 3


async def test_disagreement_runs_every_refinement_layer_with_references() -> None:
    p = provider(a=Script(["alpha beta"]), b=Script(["gamma delta"]), agg=Script(["x"]))
    spec = moa(agents(p, "a", "b"), Agent("agg", p, "agg"), layers=2, cut=LayerCut(agreement=0.9))
    result = await spec.stream(USER).final()
    assert [layer.cut for layer in result.report.layers] == [None, None]
    layer1_prompt = p.requests[2].messages[-1]["content"]
    assert "alpha beta" in layer1_prompt and "gamma delta" in layer1_prompt
    assert len(p.requests) == 5


async def test_budget_cut_skips_a_layer_that_would_exceed_the_ttft_budget() -> None:
    p = provider(a=Script(["one"], ttft=0.3), b=Script(["two"], ttft=0.3), agg=Script(["x"]))
    spec = moa(agents(p, "a", "b"), Agent("agg", p, "agg"), layers=2, cut=LayerCut(ttft_budget=0.5))
    result = await spec.stream(USER).final()
    assert [layer.cut for layer in result.report.layers] == ["budget"]


async def test_partial_aggregation_feeds_running_proposers_text_marked_partial() -> None:
    p = provider(
        a=Script([f"a{i} " for i in range(200)], ttft=0.01, interval=0.01),
        b=Script([f"b{i} " for i in range(200)], ttft=0.01, interval=0.01),
        agg=Script(["x"]),
    )
    spec = moa(agents(p, "a", "b"), Agent("agg", p, "agg"), policy=Partial(2, min_tokens=5))
    result = await spec.stream(USER).final()
    layer = result.report.layers[0]
    assert layer.reason == "partial"
    assert [r.status for r in layer.references] == ["partial", "partial"]
    prompt = p.requests[-1].messages[-1]["content"]
    assert prompt.count('status="partial, still being written"') == 2
    assert "a4 " in prompt and "a199" not in prompt
    assert result.report.ttft_s < 1.0, "did not wait for 200 tokens"


async def test_deadline_moves_on_with_what_completed() -> None:
    p = provider(a=Script(["a"], ttft=0.01), b=Script(["b"], ttft=5.0), agg=Script(["x"]))
    spec = moa(agents(p, "a", "b"), Agent("agg", p, "agg"), policy=Deadline(0.2))
    result = await spec.stream(USER).final()
    layer = result.report.layers[0]
    assert layer.reason == "deadline"
    assert 0.2 <= layer.decided_s < 2.0
    assert [r.status for r in layer.references] == ["complete"]


async def test_self_moa_sends_separate_requests_with_distinct_seeds() -> None:
    p = provider(m=Script(["s"]))
    spec = self_moa(Agent("m", p, "m"), 4)
    result = await spec.stream(USER).final()
    proposals = p.requests[:4]
    assert len({r.extra["seed"] for r in proposals}) == 4
    assert all("n" not in r.extra for r in proposals)
    assert len(result.report.layers[0].references) == 4


async def test_single_sends_the_conversation_unchanged_and_overrides_apply_to_it() -> None:
    p = provider(m=Script(["hi"]))
    spec = single(Agent("m", p, "m", temperature=0.2))
    result = await spec.stream(USER, temperature=0.9, max_tokens=7, stop=["\n"]).final()
    request = p.requests[0]
    assert list(request.messages) == USER
    assert (request.temperature, request.max_tokens, request.stop) == (0.9, 7, ("\n",))
    assert result.text == "hi" and result.report.layers == ()


async def test_aggregator_connection_is_prewarmed_while_proposers_run() -> None:
    p = provider(a=Script(["a"]), agg=Script(["x"]))
    await moa(agents(p, "a"), Agent("agg", p, "agg")).stream(USER).final()
    assert p.prewarmed == 1


async def test_events_can_be_consumed_only_once() -> None:
    p = provider(a=Script(["a"]), agg=Script(["x"]))
    async with moa(agents(p, "a"), Agent("agg", p, "agg")).stream(USER) as run:
        run.events()
        with pytest.raises(RuntimeError):
            run.events()
