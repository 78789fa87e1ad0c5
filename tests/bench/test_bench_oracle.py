"""The oracle: hand-made schedules, and agreement with what the simulator really scheduled."""

from __future__ import annotations

import dataclasses

import pytest
from support.bench import MODELS

from moa_stream._types import ChatRequest
from moa_stream.bench._recording import CallLog, RecordingProvider, current_log
from moa_stream.bench._simhost import record_fields
from moa_stream.bench.oracle import (
    RecordSchedule,
    Scheduled,
    attempt_cost,
    oracle_parts,
    oracle_ttft,
    ready_at,
    run_oracle,
)
from moa_stream.bench.trace import CallTrace, LayerTrace, RefTrace, RunTrace, trace_from_report
from moa_stream.engine import Agent, MoA, Quorum, RunResult, moa
from moa_stream.providers import OpenAIProvider, RetryPolicy
from moa_stream.sim import SimServer

# The simulator fixture: the fast models of support.bench.
pytestmark = pytest.mark.moa_sim(*MODELS, seed=0)


def plan(offsets: list[float], tokens: list[str] | None = None, **kw: object) -> Scheduled:
    tokens = tokens if tokens is not None else ["tok "] * len(offsets)
    end = kw.pop("end_offset", offsets[-1] if offsets else 0.0)
    chars = tuple(len(t) for t in tokens)
    return Scheduled(tuple(offsets), chars, end, **kw)  # type: ignore[arg-type]


async def _final_and_calls(
    spec: MoA, provider: RecordingProvider, question: str
) -> tuple[RunResult, CallLog]:
    """Run ``spec`` on ``question`` to its end, logging its calls; then close ``provider``."""
    log = CallLog()
    token = current_log.set(log)
    try:
        async with spec.stream([{"role": "user", "content": question}]) as run:
            result = await run.final()
    finally:
        current_log.reset(token)
        await provider.aclose()
    return result, log


def test_oracle_adds_the_slowest_used_reference_of_each_layer_and_the_aggregator() -> None:
    assert oracle_ttft([[0.5, 1.25, 0.75], [0.25]], 0.5) == pytest.approx(2.0)
    assert oracle_ttft([[], [0.25]], 0.5) == pytest.approx(0.75)
    assert oracle_ttft([], 0.3) == pytest.approx(0.3)


def test_ready_at_a_complete_reference_is_its_end() -> None:
    assert ready_at([plan([0.1, 0.2, 0.3], end_offset=0.31)]) == pytest.approx(0.31)


def test_ready_at_a_partial_reference_is_its_last_used_token() -> None:
    p = plan([0.1, 0.2, 0.3], ["a ", "bb ", "c"])
    assert ready_at([p], used_chars=2) == pytest.approx(0.1)
    assert ready_at([p], used_chars=3) == pytest.approx(0.2)
    assert ready_at([p], used_chars=5) == pytest.approx(0.2)
    assert ready_at([p], used_chars=6) == pytest.approx(0.3)


def test_failed_attempts_cost_what_the_simulator_made_them_cost() -> None:
    refused = plan([0.5], fault="rate_limit", retry_after_s=0.75)
    broken = plan([0.5], fault="server_error")
    reset = plan([0.1, 0.2, 0.4], fault="reset_mid", fault_at=2)
    assert attempt_cost(refused) == pytest.approx(0.75)
    assert attempt_cost(broken) == 0.0
    assert attempt_cost(reset) == pytest.approx(0.4)
    final = plan([0.1, 0.2])
    assert ready_at([refused, broken, final]) == pytest.approx(0.95)


class _Schedule:
    """Plans by model name, one per attempt."""

    def __init__(self, plans: dict[str, list[Scheduled]]) -> None:
        self._plans = plans

    def attempts(self, call: CallTrace) -> list[Scheduled]:
        return self._plans[call.model][: call.tries]


def _call(role: str, layer: int, index: int, model: str, tries: int = 1) -> CallTrace:
    return CallTrace(
        role=role,  # type: ignore[arg-type]
        layer=layer,
        index=index,
        agent=model,
        model=model,
        status="complete",
        started_s=0.0,
        ttft_s=0.1,
        duration_s=1.0,
        request=ChatRequest(messages=[], model=model),
        tries=tries,
    )


def test_run_oracle_on_a_hand_made_run() -> None:
    schedule = _Schedule(
        {
            "a": [plan([0.2, 0.4], ["x ", "y"])],
            "b": [plan([0.5], fault="rate_limit", retry_after_s=1.0), plan([0.3, 0.6])],
            "c": [plan([2.0, 3.0], ["xx ", "yy"])],
            "agg": [plan([0.25, 0.5])],
        }
    )
    trace = RunTrace(
        calls=(
            _call("proposer", 0, 0, "a"),
            _call("proposer", 0, 1, "b", tries=2),
            _call("proposer", 0, 2, "c"),
            _call("aggregator", 1, 0, "agg"),
        ),
        layers=(
            LayerTrace(
                0,
                "partial",
                1.7,
                (RefTrace(0, "complete", 3), RefTrace(1, "complete", 8), RefTrace(2, "partial", 2)),
            ),
        ),
        ttft_s=2.0,
        total_s=3.0,
    )
    # a ready at 0.4, b at 1.0 (Retry-After) + 0.6, c's first token (2.0); aggregator 0.25.
    assert run_oracle(trace, schedule) == pytest.approx(2.25)
    no_answer = RunTrace(trace.calls, trace.layers, None, 3.0)
    assert run_oracle(no_answer, schedule) is None


async def test_the_schedule_from_the_records_is_what_the_simulator_did(sim: SimServer) -> None:
    provider = RecordingProvider(OpenAIProvider(sim.base_url, name="sim"))
    agents = {m.name: Agent(m.name, provider, m.name) for m in MODELS}
    spec = moa([agents["fast"], agents["mid"], agents["slow"]], agents["agg"], policy=Quorum(2))
    result, log = await _final_and_calls(spec, provider, "[Q3] the question")
    await sim.wait_idle()
    schedule = RecordSchedule({r.request_id: record_fields(r) for r in sim.records})
    records = {r.model: r for r in sim.records}
    assert len(log.calls) == 4
    trace = trace_from_report(result.report, log.calls)
    chars = {a.request_id: a.chars for a in result.report.agents}
    for call in trace.calls:
        record = records[call.model]
        attempts = schedule.attempts(call)
        assert attempts is not None and len(attempts) == 1
        (p,) = attempts
        assert record.scheduled_ttft_s is not None and record.queued_s is not None
        assert p.offsets[0] == pytest.approx(record.scheduled_ttft_s - record.queued_s, abs=1e-9)
        assert record.question_id == "Q3"
        if call.status == "complete":
            # Everything planned went out: the plan's tokens are the text the client read.
            assert sum(p.token_chars) == chars[call.request_id]
            assert record.completion_tokens == len(p.offsets)
    oracle = run_oracle(trace, schedule)
    assert result.report.ttft_s is not None and oracle is not None
    assert 0 < oracle <= result.report.ttft_s


async def test_trace_matches_requests_to_report_entries_by_request_id(sim: SimServer) -> None:
    provider = RecordingProvider(OpenAIProvider(sim.base_url, name="sim"))
    # Two proposers on one model: order alone cannot tell their requests apart.
    spec = moa(
        [Agent("one", provider, "fast"), Agent("two", provider, "fast")],
        Agent("agg", provider, "agg"),
    )
    result, log = await _final_and_calls(spec, provider, "[Q5] the question")
    agents = result.report.agents
    assert all(a.request_id is not None for a in agents)
    # Listed in another order than the requests were made, each entry still gets its own.
    shuffled = dataclasses.replace(result.report, agents=tuple(reversed(agents)))
    trace = trace_from_report(shuffled, log.calls)
    assert [c.request_id for c in trace.calls] == [a.request_id for a in reversed(agents)]
    assert [c.agent for c in trace.calls] == [a.agent for a in reversed(agents)]
    # Without ids, the n-th request for a model goes to the n-th entry for it.
    anonymous = tuple(dataclasses.replace(a, request_id=None) for a in agents)
    trace = trace_from_report(dataclasses.replace(result.report, agents=anonymous), log.calls)
    assert [c.request_id for c in trace.calls] == [a.request_id for a in agents]


async def test_a_retried_reference_is_ready_after_its_refusal_and_its_retry(
    sim: SimServer,
) -> None:
    provider = RecordingProvider(
        OpenAIProvider(sim.base_url, name="sim", retry=RetryPolicy(max_attempts=2))
    )
    refused_once = {"sim": {"fault": "rate_limit", "times": 1, "retry_after": 0.25}}
    spec = moa([Agent("fast", provider, "fast", extra=refused_once)], Agent("agg", provider, "agg"))
    result, log = await _final_and_calls(spec, provider, "[Q4] the question")
    await sim.wait_idle()
    schedule = RecordSchedule({r.request_id: record_fields(r) for r in sim.records})
    trace = trace_from_report(result.report, log.calls)
    call = trace.call("proposer", 0, 0)
    assert call is not None and call.tries == 2
    attempts = schedule.attempts(call)
    assert attempts is not None
    assert [(a.fault, a.retry_after_s) for a in attempts] == [("rate_limit", 0.25), (None, 0.0)]
    parts = oracle_parts(trace, schedule)
    assert parts is not None
    assert parts.layers == (pytest.approx(0.25 + attempts[1].end_offset),)
