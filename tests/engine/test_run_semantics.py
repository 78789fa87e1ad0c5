"""Regression tests of the run's semantics: leaving early, unmet policies, decisions on what
arrived together, usable answers, accounting, failures of providers and aggregators.

Each test pins one behaviour by what happened (statuses, counts, prompts, event order), not by
how long it took: scripted streams sleep on the real clock, and the machine may be slow.
"""

from __future__ import annotations

import ast
import asyncio
import time
from pathlib import Path
from typing import Self

import pytest

from moa_stream import AggregatorError, ConfigError, ModelNotFoundError, ServerError
from moa_stream._types import ChatRequest, Delta, StreamTimings, Usage
from moa_stream.engine import (
    Agent,
    AllOf,
    Deadline,
    Event,
    LayerCut,
    MoA,
    Partial,
    Quorum,
    WaitAll,
    moa,
)
from moa_stream.testing import Script, ScriptedProvider, collect_events

USER = [{"role": "user", "content": "What is 2 + 2?"}]


def provider(**scripts: Script) -> ScriptedProvider:
    return ScriptedProvider(dict(scripts))


def agents(p: ScriptedProvider, *models: str) -> list[Agent]:
    return [Agent(m, p, m) for m in models]


def agent_report(run_report, name: str):  # type: ignore[no-untyped-def]
    return next(a for a in run_report.agents if a.agent == name)


# -- 1. leaving early ----------------------------------------------------------------------------


async def test_leaving_before_run_done_cancels_every_proposer_at_once() -> None:
    """A break at the first proposer.delta must not let the proposers run on (and be billed)."""
    p = provider(
        a=Script(["a "] * 200, ttft=0.01, interval=0.01),
        b=Script(["b "] * 200, ttft=0.01, interval=0.01),
        agg=Script(["x"]),
    )
    run = moa(agents(p, "a", "b"), Agent("agg", p, "agg"), policy=Quorum(1)).stream(USER)
    async with run:
        async for event in run.events():
            if event.type == "proposer.delta":
                break
    report = run.report
    for name in ("a", "b"):
        a = agent_report(report, name)
        assert a.status == "cancelled", f"{name} ran on after the caller left"
        assert a.usage.completion_tokens < 200
    assert p.open_streams == 0


async def test_leaving_at_layer_done_closes_the_aggregator_request_already_sent() -> None:
    p = provider(a=Script(["a"]), agg=Script(["x"] * 50, ttft=0.01, interval=0.01))
    run = moa(agents(p, "a"), Agent("agg", p, "agg")).stream(USER)
    async with run:
        async for event in run.events():
            if event.type == "layer.done":
                assert p.requests[-1].model == "agg", "sent before layer.done"
                break
    assert p.open_streams == 0


async def test_an_exception_in_the_callers_loop_cancels_every_proposer() -> None:
    p = provider(
        a=Script(["a "] * 200, ttft=0.01, interval=0.01),
        agg=Script(["x"]),
    )
    run = moa(agents(p, "a"), Agent("agg", p, "agg")).stream(USER)

    async def consume() -> None:
        async with run:
            async for event in run.events():
                if event.type == "proposer.delta":
                    raise KeyError("caller's bug")

    with pytest.raises(KeyError):
        await consume()
    assert agent_report(run.report, "a").status == "cancelled"
    assert p.open_streams == 0


async def test_aclose_from_another_task_stops_the_run_at_once() -> None:
    """A stop button: aclose() from another task ends the consumer's iteration and closes the
    aggregator's stream before it returns."""
    p = provider(
        a=Script(["ref"]),
        agg=Script(["tok "] * 500, ttft=0.01, interval=0.01),
    )
    run = moa(agents(p, "a"), Agent("agg", p, "agg")).stream(USER)
    answering = asyncio.Event()
    seen: list[str] = []

    async def consume() -> None:
        async for event in run.events():
            seen.append(event.type)
            if event.type == "aggregator.delta":
                answering.set()

    async with run:
        consumer = asyncio.create_task(consume())
        await answering.wait()
        await run.aclose()
        assert p.open_streams == 0, "the aggregator kept streaming after aclose() returned"
        await asyncio.wait_for(consumer, 5)
    assert "run.done" not in seen
    assert seen.count("aggregator.delta") < 500
    assert run.report.error is not None


async def test_cancelling_the_keep_wait_cancels_the_stragglers_and_a_second_aclose_works() -> None:
    p = provider(
        a=Script(["a"], ttft=0.01),
        slow=Script(["s"], ttft=30.0),
        agg=Script(["x"]),
    )
    spec = moa(agents(p, "a", "slow"), Agent("agg", p, "agg"), policy=Quorum(1), stragglers="keep")
    run = spec.stream(USER)
    await run.__aenter__()
    async for _ in run.events():
        pass
    closing = asyncio.create_task(run.aclose())
    await asyncio.sleep(0.05)
    assert not closing.done(), "waits for the kept straggler"
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    assert p.open_streams == 0, "cancelling the wait must cancel the straggler"
    await run.aclose()
    assert p.open_streams == 0


async def test_keep_grace_is_set_on_stream_and_bounds_the_wait_after_run_done() -> None:
    p = provider(a=Script(["a"], ttft=0.01), slow=Script(["s"], ttft=30.0), agg=Script(["x"]))
    spec = moa(agents(p, "a", "slow"), Agent("agg", p, "agg"), policy=Quorum(1), stragglers="keep")
    run = spec.stream(USER, keep_grace=0.05)
    async with run:
        async for _ in run.events():
            pass
    assert agent_report(run.report, "slow").status == "cancelled"
    assert p.open_streams == 0


# -- 2. unmet policies -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "names", "fallback"),
    [
        (Quorum(3), ("bad1", "bad2", "ok1", "ok2"), "quorum(2)"),
        (Quorum(4), ("bad1", "ok1", "ok2", "ok3"), "quorum(3)"),
        (Deadline(2.0, min_k=2), ("bad1", "ok1"), "deadline(2.0)"),
        (Partial(2, min_tokens=1), ("bad1", "bad2", "ok1"), "partial(1, min_tokens=1)"),
    ],
)
async def test_an_unreachable_policy_waits_for_the_survivors(
    policy: Quorum | Deadline | Partial, names: tuple[str, ...], fallback: str
) -> None:
    p = provider(
        bad1=Script([], error=ServerError("boom", status=500)),
        bad2=Script([], error=ServerError("boom", status=500)),
        ok1=Script(["one"], ttft=0.2),
        ok2=Script(["two"], ttft=0.25),
        ok3=Script(["three"], ttft=0.3),
        agg=Script(["x"]),
    )
    spec = moa(agents(p, *names), Agent("agg", p, "agg"), policy=policy)
    result = await spec.stream(USER).final()
    layer = result.report.layers[0]
    assert layer.reason == "degraded"
    assert layer.fallback == fallback
    survivors = [n for n in names if n.startswith("ok")]
    assert [r.agent for r in layer.references if r.status == "complete"] == survivors
    prompt = p.requests[-1].messages[-1]["content"]
    for name in survivors:
        assert p.scripts[name].tokens[0] in prompt
        assert agent_report(result.report, name).status == "complete"


# -- 3. deciding on everything that arrived together ---------------------------------------------


async def test_a_last_chunk_and_its_end_read_together_are_decided_together() -> None:
    """All three chunks and the end arrive in one loop turn: the answer is complete, not
    "still being written"."""
    p = provider(a=Script(["one ", "two ", "three"]), agg=Script(["x"]))
    spec = moa(agents(p, "a"), Agent("agg", p, "agg"), policy=Partial(1, min_tokens=3))
    result = await spec.stream(USER).final()
    layer = result.report.layers[0]
    assert [r.status for r in layer.references] == ["complete"]
    assert layer.reason != "partial"
    assert "still being written" not in p.requests[-1].messages[-1]["content"]


# -- 4. & does not depend on operand order -------------------------------------------------------


class _Status:
    n = 2
    done = 1
    failed = 0
    elapsed = 0.5
    tokens = (3, 3)
    finished = (True, False)


def test_all_of_gives_the_same_decision_in_either_order() -> None:
    a = Partial(2, min_tokens=2) & Deadline(0.2)
    b = Deadline(0.2) & Partial(2, min_tokens=2)
    assert isinstance(a, AllOf) and isinstance(b, AllOf)
    fire_a, fire_b = a.check(_Status()), b.check(_Status())
    assert fire_a is not None and fire_a == fire_b
    assert fire_a.partial, "the partial references must go in whichever order"


# -- 5. providers that raise at once ------------------------------------------------------------


class RaisingProvider:
    """A provider whose stream() raises before returning a stream (a closed provider does)."""

    name = "raising"

    def stream(self, request: ChatRequest):  # type: ignore[no-untyped-def]
        raise ModelNotFoundError("no such model", status=404)

    async def prewarm(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


async def test_a_proposer_whose_stream_raises_at_once_fails_without_hanging_the_run() -> None:
    p = provider(a=Script(["a"]), agg=Script(["x"]))
    spec = moa(
        [Agent("a", p, "a"), Agent("gone", RaisingProvider(), "gone")],  # type: ignore[arg-type]
        Agent("agg", p, "agg"),
    )
    async with asyncio.timeout(5):
        events = await collect_events(spec.stream(USER))
    failed = [e for e in events if e.type == "proposer.failed"]
    assert [e.agent for e in failed] == ["gone"] and failed[0].kind != "internal"
    assert events[-1].type == "run.done"


async def test_an_aggregator_whose_stream_raises_at_once_falls_back() -> None:
    p = provider(a=Script(["a"]), backup=Script(["from backup"]))
    spec = MoA(
        layers=moa(agents(p, "a"), Agent("backup", p, "backup")).layers,
        aggregator=Agent("agg", RaisingProvider(), "agg"),  # type: ignore[arg-type]
        fallbacks=(Agent("backup", p, "backup"),),
    )
    async with asyncio.timeout(5):
        events = await collect_events(spec.stream(USER))
    assert [e.type for e in events if e.type.startswith("aggregator.")][:2] == [
        "aggregator.started",
        "aggregator.failed",
    ]
    assert events[-1].report.text == "from backup"


# -- 6. usable answers ---------------------------------------------------------------------------


async def test_empty_and_filtered_answers_do_not_count_as_complete() -> None:
    p = provider(
        empty=Script([], finish_reason="stop", ttft=0.01),
        filtered=Script(["Half of a"], finish_reason="content_filter", ttft=0.01),
        good=Script(["The answer is 4."], ttft=0.2),
        agg=Script(["4"]),
    )
    spec = moa(agents(p, "empty", "filtered", "good"), Agent("agg", p, "agg"), policy=Quorum(2))
    result = await spec.stream(USER).final()
    layer = result.report.layers[0]
    assert [(r.agent, r.status) for r in layer.references] == [
        ("empty", "failed"),
        ("filtered", "failed"),
        ("good", "complete"),
    ]
    assert agent_report(result.report, "good").status == "complete"
    prompt = p.requests[-1].messages[-1]["content"]
    assert "The answer is 4." in prompt
    assert "Half of a" not in prompt  # a failed reference is quoted without its text


async def test_an_answer_cut_by_max_tokens_counts_and_is_quoted_to_its_last_sentence_end() -> None:
    p = provider(
        cut=Script(["The sky is blue. Light scatters", " off the air and"], finish_reason="length"),
        whole=Script(["Blue light scatters most."], ttft=0.2),
        agg=Script(["x"]),
    )
    spec = moa(agents(p, "cut", "whole"), Agent("agg", p, "agg"), policy=Quorum(2))
    result = await spec.stream(USER).final()
    assert [r.status for r in result.report.layers[0].references] == ["complete", "complete"]
    prompt = p.requests[-1].messages[-1]["content"]
    assert "The sky is blue.\n" in prompt
    assert "Light scatters" not in prompt


async def test_what_counts_as_usable_is_configurable_on_the_layer() -> None:
    from dataclasses import replace

    from moa_stream.engine import UsableAnswer

    p = provider(cut=Script(["half an"], finish_reason="length"), agg=Script(["x"]))
    spec = moa(agents(p, "cut"), Agent("agg", p, "agg"))
    spec = spec.with_policy(WaitAll(), usable=UsableAnswer(finish_reasons=("stop",)))
    result = await spec.stream(USER).final()
    assert [r.status for r in result.report.layers[0].references] == ["failed"]
    assert replace(spec.layers[0]).usable.finish_reasons == ("stop",)


async def test_two_empty_answers_do_not_agree_and_cut_the_refinement_layers() -> None:
    p = provider(a=Script([]), b=Script([]), agg=Script(["x"]))
    spec = moa(agents(p, "a", "b"), Agent("agg", p, "agg"), layers=2, cut=LayerCut(agreement=0.9))
    result = await spec.stream(USER).final()
    assert [layer.cut for layer in result.report.layers] == [None, None]


# -- 7. the agreement measure ----------------------------------------------------------------------


def test_agreement_compares_conclusions_not_words() -> None:
    from moa_stream.engine.similarity import conclusion_match, final_line_match

    reasoning = "Add the two prices, subtract the discount, and the total follows. "
    answers = [reasoning + f"The answer is {n}." for n in (84, 85, 96)]
    assert conclusion_match(answers[0], answers[1]) == 0.0
    assert conclusion_match(answers[0], reasoning + "The answer is 84.") == 1.0
    assert conclusion_match("It is safe.", "It is not safe.") == 0.0
    assert final_line_match("Yes.\nHope this helps!", "No.\nHope this helps!") == 0.0


async def test_agreement_is_not_measured_on_the_last_layer() -> None:
    calls: list[tuple[str, str]] = []

    def counting(a: str, b: str) -> float:
        calls.append((a, b))
        return 1.0

    p = provider(a=Script(["4"]), b=Script(["4"]), agg=Script(["x"]))
    spec = moa(
        agents(p, "a", "b"),
        Agent("agg", p, "agg"),
        layers=1,
        cut=LayerCut(agreement=0.5, similarity=counting),
    )
    result = await spec.stream(USER).final()
    assert calls == [], "measured agreement where no layer was left to cut"
    assert result.report.layers[0].agreement is None


# -- 8. accounting ---------------------------------------------------------------------------------


class _ReasoningStream:
    """A stream that reasons for a long time, and whose provider estimates its usage."""

    def __init__(self) -> None:
        self.chunks = 0
        self.finish_reason: str | None = None
        self.timings = StreamTimings()
        self.closed = False

    @property
    def usage(self) -> Usage:
        return Usage(5, self.chunks, estimated=True)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Delta:
        await asyncio.sleep(0.005)
        self.chunks += 1
        return Delta(reasoning="hmm ")

    async def aclose(self) -> None:
        self.closed = True

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class _ReasoningProvider:
    name = "reasoning"

    def __init__(self) -> None:
        self.streams: list[_ReasoningStream] = []

    def stream(self, request: ChatRequest) -> _ReasoningStream:
        s = _ReasoningStream()
        self.streams.append(s)
        return s

    async def prewarm(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


async def test_the_usage_of_a_cancelled_proposer_is_its_providers_figure() -> None:
    """A cancelled reasoning proposer cost what its provider counted, not zero."""
    p = provider(fast=Script(["4"], ttft=0.05), agg=Script(["x"]))
    thinker = _ReasoningProvider()
    spec = moa(
        [Agent("fast", p, "fast"), Agent("thinker", thinker, "thinker")],  # type: ignore[arg-type]
        Agent("agg", p, "agg"),
        policy=Quorum(1),
    )
    result = await spec.stream(USER).final()
    report = agent_report(result.report, "thinker")
    assert report.status == "cancelled"
    assert thinker.streams[0].chunks > 0
    assert report.usage == Usage(5, thinker.streams[0].chunks, estimated=True)


async def test_layer_done_and_proposer_done_report_the_same_tokens() -> None:
    p = provider(a=Script(["a long answer of many characters, in one chunk"]), agg=Script(["x"]))
    events = await collect_events(moa(agents(p, "a"), Agent("agg", p, "agg")).stream(USER))
    done = next(e for e in events if e.type == "proposer.done")
    layer = next(e for e in events if e.type == "layer.done")
    assert layer.references[0].tokens == done.usage.completion_tokens


# -- 9. k > n, all failed, aggregator failing mid-stream -----------------------------------------


@pytest.mark.parametrize("policy", [Quorum(5), Partial(5), Quorum(2) | Deadline(1.0, min_k=4)])
def test_a_policy_asking_for_more_proposers_than_the_layer_has_is_rejected(policy) -> None:  # type: ignore[no-untyped-def]
    p = provider()
    with pytest.raises(ConfigError, match="asks for"):
        moa(agents(p, "a", "b", "c"), Agent("agg", p, "agg"), policy=policy)


def test_policy_arguments_raise_config_errors_like_every_other_setting() -> None:
    with pytest.raises(ConfigError):
        Quorum(0)
    with pytest.raises(ConfigError):
        Deadline(-1.0)


async def test_when_every_proposer_fails_the_aggregator_answers_the_plain_conversation() -> None:
    p = provider(
        bad1=Script([], error=ServerError("boom", status=500)),
        bad2=Script([], error=ServerError("boom", status=500)),
        agg=Script(["4"]),
    )
    result = await moa(agents(p, "bad1", "bad2"), Agent("agg", p, "agg")).stream(USER).final()
    assert result.report.layers[0].reason == "degraded"
    assert list(p.requests[-1].messages) == USER


async def test_an_aggregator_failing_mid_stream_emits_aggregator_failed_before_the_error() -> None:
    p = provider(
        a=Script(["ref"]),
        agg=Script(["half ", "an ", "answer"], error=ServerError("gone", status=502), fail_after=2),
    )
    run = moa(agents(p, "a"), Agent("agg", p, "agg")).stream(USER)
    seen: list[Event] = []

    async def consume() -> None:
        async with run:
            async for event in run.events():
                seen.append(event)

    with pytest.raises(AggregatorError):
        await consume()
    assert seen[-1].type == "aggregator.failed"
    assert seen[-1].agent == "agg"


# -- issue-12 structure: no import cycle in the engine --------------------------------------------


def test_engine_modules_import_each_other_without_a_cycle() -> None:
    """Every import counts, deferred ones inside functions too, except those under
    ``if TYPE_CHECKING:`` (for annotations only)."""
    root = Path(__file__).resolve().parents[2] / "moa_stream" / "engine"
    graph: dict[str, set[str]] = {}

    def imports(node: ast.AST, deps: set[str]) -> None:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING":
            return
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
            "moa_stream.engine."
        ):
            deps.add((node.module or "").rsplit(".", 1)[1])
        for child in ast.iter_child_nodes(node):
            imports(child, deps)

    for path in root.glob("*.py"):
        deps: set[str] = set()
        imports(ast.parse(path.read_text()), deps)
        graph[path.stem] = deps - {"__init__"}

    def visit(name: str, stack: tuple[str, ...]) -> None:
        assert name not in stack, f"import cycle: {' -> '.join((*stack, name))}"
        for dep in graph.get(name, ()):
            visit(dep, (*stack, name))

    for name in graph:
        if name != "__init__":
            visit(name, ())


async def test_leaving_early_takes_no_longer_than_the_cancellation() -> None:
    """The exit itself: well under the 2 s the proposers would take to finish."""
    p = provider(
        a=Script(["a "] * 200, ttft=0.01, interval=0.01),
        b=Script(["b "] * 200, ttft=0.01, interval=0.01),
        agg=Script(["x"]),
    )
    run = moa(agents(p, "a", "b"), Agent("agg", p, "agg"), policy=Quorum(1)).stream(USER)
    async with run:
        async for _text in run.events():
            started = time.monotonic()
            break
    assert time.monotonic() - started < 1.5


async def test_no_prewarm_when_wait_all_proposers_hand_back_warm_connections() -> None:
    """Two wait_all proposers on the aggregator's provider return their connections to its
    pool before the decision: a pre-warm request would be pure extra load."""
    p = provider(a=Script(["a"]), b=Script(["b"]), agg=Script(["x"]))
    await moa(agents(p, "a", "b"), Agent("agg", p, "agg")).stream(USER).final()
    assert p.prewarmed == 0
    q = provider(a=Script(["a"]), b=Script(["b"]), agg=Script(["x"]))
    await moa(agents(q, "a", "b"), Agent("agg", q, "agg"), policy=Quorum(1)).stream(USER).final()
    assert q.prewarmed == 1, "a quorum may decide before any connection is back"
