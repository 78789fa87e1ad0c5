"""The staircase aggregator over real HTTP against the simulator: both continuation methods,
one seamless answer, prefix reuse between steps, fallback, failure and cancellation.

Latencies are fixed; proposers write slower than the aggregator, so the aggregator must wait
for them at step boundaries (the ``lead``) and each step sees more of their text.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from moa_stream import AggregatorError, OpenAIProvider, RetryPolicy
from moa_stream.engine import Agent, Partial, moa
from moa_stream.engine.events import AggregatorStep
from moa_stream.engine.staircase import Continuation, Staircase
from moa_stream.sim import FaultProfile, LatencyProfile, SimModel, SimServer
from moa_stream.sim.quiz import get_question, score

USER = [{"role": "user", "content": "Explain at length why the sea is salty."}]
QUESTION = get_question("Q5")


def model(name: str, ttft: float, tokens: int, tps: float, **kw: Any) -> SimModel:
    return SimModel(
        name=name,
        latency=LatencyProfile.fixed(ttft=ttft, tokens_per_s=tps),
        answer_tokens=tokens,
        **kw,
    )


MODELS = [
    model("p-a", 0.02, 120, 600.0, accuracy=1.0),
    model("p-b", 0.03, 120, 500.0, accuracy=0.0),
    model("p-slow", 0.05, 120, 100.0, accuracy=1.0),
    model("agg", 0.02, 160, 2000.0, accuracy=0.0),
    model("agg-llama", 0.02, 160, 2000.0, continue_trailing_assistant=True, echo_prefill=True),
    model("agg-broken", 0.02, 160, 2000.0, faults=FaultProfile(server_error=1.0)),
    model("agg-reset", 0.02, 160, 2000.0, faults=FaultProfile(reset_mid=1.0)),
]


@pytest.fixture
async def sim() -> AsyncIterator[SimServer]:
    async with SimServer(models=MODELS, seed=5) as server:
        yield server


@pytest.fixture
async def provider(sim: SimServer) -> AsyncIterator[OpenAIProvider]:
    async with OpenAIProvider(sim.base_url, name="sim", retry=RetryPolicy(max_attempts=1)) as p:
        yield p


def stairs(
    provider: OpenAIProvider,
    aggregator: str = "agg",
    continuation: Continuation | None = None,
    fallbacks: tuple[str, ...] = (),
    **kw: Any,
):
    proposers = [Agent(n, provider, n) for n in ("p-a", "p-b", "p-slow")]
    return moa(
        proposers,
        Agent(aggregator, provider, aggregator),
        policy=Partial(2, min_tokens=8),
        fallbacks=[Agent(f, provider, f) for f in fallbacks],
        staircase=Staircase(
            steps=(8, 16, 32),
            lead=kw.pop("lead", 4),
            default=continuation or Continuation(),
            # The aggregator here writes 20 times faster than the slowest proposer: a long
            # pause lets every step boundary wait for the references, as these tests need.
            max_pause=kw.pop("max_pause", 5.0),
            min_news=kw.pop("min_news", 1),
            max_steps=kw.pop("max_steps", None),
            layout=kw.pop("layout", "updates"),
        ),
        **kw,
    )


async def collect(spec, messages=USER) -> tuple[str, list[AggregatorStep], Any]:
    steps: list[AggregatorStep] = []
    async with spec.stream(messages) as run:
        async for event in run.events():
            if event.type == "aggregator.step":
                steps.append(event)
        report = run.report
    return run.answer, steps, report


@pytest.mark.parametrize(
    ("aggregator", "continuation", "kind"),
    [
        ("agg", Continuation("prefill", "vllm"), "prefill"),
        ("agg", Continuation("prefill", "prefix"), "prefill"),
        ("agg", Continuation("turns"), "turns"),
        ("agg-llama", Continuation("prefill", "llama"), "prefill"),
    ],
)
async def test_steps_continue_one_answer_seamlessly(
    sim: SimServer, provider: OpenAIProvider, aggregator: str, continuation: Continuation, kind: str
) -> None:
    answer, steps, report = await collect(stairs(provider, aggregator, continuation))
    agg_records = [r for r in sim.records if r.model == aggregator]
    assert len(steps) >= 3 and len(agg_records) == len(steps)
    assert [s.step for s in steps] == list(range(len(steps)))
    assert steps[-1].final and not steps[0].final
    # later steps see more of the references
    assert sum(r.chars for r in steps[-1].references) > sum(r.chars for r in steps[0].references)
    assert all(r.continuation == kind for r in agg_records[1:])
    assert agg_records[0].continuation is None
    # each step extends the previous request: all of it the next step still holds (for a
    # prefill, all but the answer so far, which moved) came from the model's prefix cache
    for i in range(1, len(agg_records)):
        before = agg_records[i - 1].prompt_tokens
        if kind == "prefill" and i > 1:
            before -= steps[i - 1].answer_chars // 4
        assert agg_records[i].cached_tokens >= before - 20, (i, agg_records[i])
    # one seamless text: the whole planned answer (160 words), no word repeated or lost
    words = answer.split()
    assert len(words) == 160
    assert "  " not in answer
    assert report.ttft_s is not None and report.ttft_s < report.total_s
    assert sum(1 for a in report.agents if a.role == "aggregator") == len(steps)
    assert report.usage.cached_prompt_tokens > 0


async def test_the_answer_line_comes_from_the_references_of_the_last_step(
    provider: OpenAIProvider,
) -> None:
    """The aggregator alone is always wrong (accuracy 0), and so is one proposer: the answer
    line is right only if the step that writes it sees both right answers, the slow one's
    included (with one right and one wrong visible, the tie goes to the aggregator's own)."""
    answer, steps, _ = await collect(
        stairs(provider), [{"role": "user", "content": QUESTION.prompt}]
    )
    assert steps[-1].final
    assert all(r.status == "complete" for r in steps[-1].references)
    assert score(answer, QUESTION)


@pytest.mark.parametrize(
    ("aggregator", "continuation"),
    [("agg", Continuation("turns")), ("agg-llama", Continuation("prefill", "llama"))],
)
async def test_the_whole_layout_refreshes_the_drafts_and_keeps_one_answer(
    sim: SimServer, provider: OpenAIProvider, aggregator: str, continuation: Continuation
) -> None:
    spec = stairs(provider, aggregator, continuation, layout="whole")
    answer, steps, _ = await collect(spec, [{"role": "user", "content": QUESTION.prompt}])
    agg_records = [r for r in sim.records if r.model == aggregator]
    assert len(steps) >= 3 and len(agg_records) == len(steps)
    assert steps[-1].final and all(r.status == "complete" for r in steps[-1].references)
    assert score(answer, QUESTION)  # the last step saw both right answers
    assert "  " not in answer and "<draft" not in answer
    # each request holds every draft whole, as it stood: later ones are longer
    quoted = [r.prompt_tokens for r in agg_records]
    assert quoted[-1] > quoted[0]


async def test_without_a_lead_the_answer_runs_ahead_of_the_references(
    provider: OpenAIProvider,
) -> None:
    """Unpaced, the aggregator (many times faster than the slow proposer) finishes its answer
    while a reference is still being written: its answer line is written from openings."""
    spec = stairs(provider, lead=None)
    _, steps, report = await collect(spec, [{"role": "user", "content": QUESTION.prompt}])
    assert not steps[-1].final
    assert any(r.status == "partial" for r in steps[-1].references)
    slow = next(a for a in report.agents if a.agent == "p-slow")
    assert slow.status != "complete"  # still running when the answer ended: a straggler


async def test_a_failure_before_the_first_token_falls_back(provider: OpenAIProvider) -> None:
    answer, steps, report = await collect(stairs(provider, "agg-broken", fallbacks=("agg",)))
    assert len(answer.split()) == 160
    assert report.aggregator == "agg"
    assert steps[0].agent == "agg-broken" and steps[-1].agent == "agg"


async def test_every_aggregator_failing_before_the_first_token_is_an_aggregator_error(
    provider: OpenAIProvider,
) -> None:
    spec = stairs(provider, "agg-broken", fallbacks=("agg-broken",))
    run = spec.stream(USER)
    failed: list[int] = []

    async def consume() -> None:
        async with run:
            async for event in run.events():
                if event.type == "aggregator.failed":
                    failed.append(event.attempt)

    with pytest.raises(AggregatorError, match="every aggregator failed before answering") as info:
        await consume()
    assert failed == [0, 1]
    assert list(info.value.errors) == ["agg-broken"]
    assert run.answer == ""


async def test_a_failure_after_the_first_token_is_an_aggregator_error(
    sim: SimServer, provider: OpenAIProvider
) -> None:
    spec = stairs(provider, "agg-reset", fallbacks=("agg",))
    seen: list[str] = []

    async def consume() -> None:
        async with spec.stream(USER) as run:
            async for text in run.text():
                seen.append(text)

    with pytest.raises(AggregatorError) as info:
        await consume()
    assert info.value.partial_text == "".join(seen) != ""
    assert "agg-reset" in info.value.errors
    await sim.wait_idle(connections=False)


async def test_leaving_mid_step_closes_every_request(
    sim: SimServer, provider: OpenAIProvider
) -> None:
    spec = stairs(provider)
    async with spec.stream(USER) as run:
        steps = 0
        async for event in run.events():
            if event.type == "aggregator.step":
                steps += 1
            if steps == 2 and event.type == "aggregator.delta":
                break
    assert steps == 2
    await sim.wait_idle(timeout=5.0)
    assert sim.in_flight == 0
    assert any(r.outcome == "client_disconnected" for r in sim.records if r.model == "agg")


async def test_cancelling_the_caller_mid_step_leaks_nothing(
    sim: SimServer, provider: OpenAIProvider
) -> None:
    spec = stairs(provider)
    started = asyncio.Event()

    async def consume() -> None:
        async with spec.stream(USER) as run:
            async for event in run.events():
                if isinstance(event, AggregatorStep) and event.step == 1:
                    started.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), 5.0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await sim.wait_idle(timeout=5.0)
    assert sim.in_flight == 0


async def test_proposer_events_go_on_while_the_steps_run(provider: OpenAIProvider) -> None:
    """The references a staircase keeps reading still reach the caller as events: each
    proposer's deltas add up to the text its ``proposer.done`` reports."""
    deltas: dict[str, list[str]] = {}
    done: dict[str, str] = {}
    async with stairs(provider).stream(USER) as run:
        async for event in run.events():
            if event.type == "proposer.delta":
                deltas.setdefault(event.agent, []).append(event.text)
            elif event.type == "proposer.done":
                done[event.agent] = event.text
    assert set(done) == {"p-a", "p-b", "p-slow"}
    assert {name: "".join(parts) for name, parts in deltas.items()} == done
