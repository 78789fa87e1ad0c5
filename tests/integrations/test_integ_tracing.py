"""OpenTelemetry spans of a run, its layers and its upstream requests, read back from the
SDK's in-memory exporter."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode, Tracer
from support.integrations import config

from moa_stream import Agent, AggregatorError, ServerError, moa, single
from moa_stream.config import Runtime
from moa_stream.engine.policies import Quorum
from moa_stream.testing import Script, ScriptedProvider
from moa_stream.tracing import AVAILABLE, TracedProvider, instrument, traced_run

USER = [{"role": "user", "content": "Why is the sky blue?"}]


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracer(exporter: InMemorySpanExporter) -> Iterator[Tracer]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider.get_tracer("test")
    provider.shutdown()


def by_name(spans: tuple[ReadableSpan, ...], prefix: str) -> list[ReadableSpan]:
    return sorted((s for s in spans if s.name.startswith(prefix)), key=lambda s: s.name)


def test_opentelemetry_is_available_in_the_test_environment() -> None:
    assert AVAILABLE


async def test_run_layer_and_request_spans(exporter: InMemorySpanExporter, tracer: Tracer) -> None:
    provider = ScriptedProvider(
        {
            "p1": Script(tokens=("a", "b", "c"), ttft=0.01),
            "p2": Script(tokens=("d", "e"), ttft=0.02),
            "agg": Script(tokens=("Blue", " light", " scatters."), ttft=0.01),
        }
    )
    spec = moa(
        [Agent("one", provider, "p1"), Agent("two", provider, "p2", temperature=0.3)],
        Agent("final", provider, "agg", max_tokens=50),
        name="sky",
    )
    traced = instrument(spec, tracer=tracer)
    async with traced_run(traced.stream(USER), tracer=tracer) as events:
        text = "".join([e.text async for e in events if e.type == "aggregator.delta"])
    assert text == "Blue light scatters."
    assert provider.open_streams == 0

    spans = exporter.get_finished_spans()
    (run,) = by_name(spans, "moa.run")
    (layer,) = by_name(spans, "moa.layer")
    chats = by_name(spans, "chat ")
    assert run.name == "moa.run sky"
    assert run.parent is None
    assert layer.parent is not None and layer.parent.span_id == run.context.span_id
    assert [c.name for c in chats] == ["chat agg", "chat p1", "chat p2"]
    for chat in chats:
        # The proposers ran in tasks of their own and the aggregator in the caller's: all of
        # them under the run span.
        assert chat.parent is not None and chat.parent.span_id == run.context.span_id
        assert chat.kind is SpanKind.CLIENT
        assert chat.attributes is not None
        assert chat.attributes["gen_ai.operation.name"] == "chat"
        assert chat.attributes["gen_ai.provider.name"] == "scripted"
        assert chat.attributes["gen_ai.usage.input_tokens"] == 10
        assert chat.attributes["gen_ai.response.finish_reasons"] == ("stop",)
        assert chat.attributes["gen_ai.response.time_to_first_chunk"] >= 0.01
    agg, p1, p2 = (c.attributes for c in chats)
    assert agg is not None and p1 is not None and p2 is not None
    assert (p1["gen_ai.agent.name"], p1["gen_ai.request.model"]) == ("one", "p1")
    assert p1["gen_ai.usage.output_tokens"] == 3
    assert p2["gen_ai.request.temperature"] == 0.3
    assert agg["gen_ai.request.max_tokens"] == 50
    assert agg["gen_ai.usage.output_tokens"] == 3

    assert layer.attributes is not None
    assert layer.attributes["moa_stream.layer"] == 0
    assert layer.attributes["moa_stream.layer.reason"] == "all"
    assert layer.attributes["moa_stream.layer.complete"] == 2
    # The layer lasts from its proposers' start to its decision, within the run.
    assert run.start_time is not None and run.end_time is not None
    assert layer.start_time is not None and layer.end_time is not None
    assert run.start_time <= layer.start_time < layer.end_time <= run.end_time
    assert (layer.end_time - layer.start_time) / 1e9 >= 0.02  # the slower proposer's TTFT

    attrs = run.attributes
    assert attrs is not None
    assert attrs["gen_ai.workflow.name"] == "sky"
    assert attrs["gen_ai.usage.output_tokens"] == 3 + 2 + 3
    assert attrs["gen_ai.usage.input_tokens"] == 30
    assert attrs["moa_stream.aggregator"] == "final"
    assert attrs["gen_ai.response.time_to_first_chunk"] >= 0.03
    assert attrs["moa_stream.time_to_quorum_s"] >= 0.02
    assert run.status.status_code is StatusCode.UNSET


async def test_failed_and_cancelled_requests(
    exporter: InMemorySpanExporter, tracer: Tracer
) -> None:
    """A failed proposer's span is an error with its kind; a straggler cancelled by the quorum
    is not an error but says it was cancelled."""
    provider = ScriptedProvider(
        {
            "ok": Script(tokens=("x",), ttft=0.05),
            "bad": Script(error=ServerError("upstream 500", status=500), fail_after=0),
            "slow": Script(tokens=("late",), ttft=30),
            "agg": Script(tokens=("done",)),
        }
    )
    agents = [Agent(n, provider, n) for n in ("ok", "bad", "slow")]
    spec = instrument(moa(agents, Agent("agg", provider, "agg"), policy=Quorum(1)), tracer=tracer)
    async with traced_run(spec.stream(USER), tracer=tracer) as events:
        async for _ in events:
            pass
    spans = {s.name: s for s in exporter.get_finished_spans()}
    bad = spans["chat bad"]
    assert bad.status.status_code is StatusCode.ERROR
    assert bad.attributes is not None and bad.attributes["error.type"] == "server"
    slow = spans["chat slow"]
    assert slow.status.status_code is StatusCode.UNSET
    assert slow.attributes is not None and slow.attributes["moa_stream.outcome"] == "cancelled"
    run = spans["moa.run moa"]
    # The failure is on the run span too, as an event at the time it happened.
    failed = [e for e in run.events if e.name == "proposer.failed"]
    assert failed and failed[0].attributes is not None
    assert failed[0].attributes["gen_ai.agent.name"] == "bad"
    layer = spans["moa.layer 0"]
    assert layer.attributes is not None and layer.attributes["moa_stream.layer.reason"] == "quorum"


async def test_a_failed_run_is_an_error_span(
    exporter: InMemorySpanExporter, tracer: Tracer
) -> None:
    provider = ScriptedProvider({"agg": Script(error=ServerError("down", status=503))})
    spec = instrument(single(Agent("only", provider, "agg")), tracer=tracer)

    async def consume() -> None:
        async with traced_run(spec.stream(USER), tracer=tracer) as events:
            async for _ in events:
                pass

    with pytest.raises(AggregatorError):
        await consume()
    (run,) = by_name(exporter.get_finished_spans(), "moa.run")
    assert run.status.status_code is StatusCode.ERROR
    assert run.attributes is not None and run.attributes["error.type"] == "AggregatorError"


async def test_leaving_early_ends_every_span(
    exporter: InMemorySpanExporter, tracer: Tracer
) -> None:
    """A caller that stops reading mid-layer: the run is closed, every span ended."""
    provider = ScriptedProvider({"p": Script(tokens=("a",) * 50, interval=0.05), "agg": Script()})
    spec = instrument(
        moa([Agent("p", provider, "p")], Agent("agg", provider, "agg")), tracer=tracer
    )
    async with traced_run(spec.stream(USER), tracer=tracer) as events:
        async for event in events:
            if event.type == "proposer.delta":
                break
    assert provider.open_streams == 0
    names = sorted(s.name for s in exporter.get_finished_spans())
    assert names == ["chat p", "moa.layer 0", "moa.run moa"]
    layer = next(s for s in exporter.get_finished_spans() if s.name == "moa.layer 0")
    assert layer.attributes is not None and layer.attributes["moa_stream.outcome"] == "cancelled"


async def test_upstream_spans_over_http(exporter: InMemorySpanExporter, tracer: Tracer) -> None:
    """Against the simulated upstream: the usage on the spans is the server's own."""
    async with Runtime(config()) as runtime:
        spec = instrument(runtime.moas["fast"], tracer=tracer)
        async with traced_run(spec.stream(USER), tracer=tracer) as events:
            async for _ in events:
                pass
        records = {r.model: r for r in runtime.sim.records}
    chats = {s.name: s for s in by_name(exporter.get_finished_spans(), "chat ")}
    assert set(chats) == {"chat p-fast", "chat agg"}
    for model, span in (("p-fast", chats["chat p-fast"]), ("agg", chats["chat agg"])):
        attrs = span.attributes
        assert attrs is not None
        assert attrs["gen_ai.usage.output_tokens"] == records[model].completion_tokens
        assert attrs["gen_ai.usage.input_tokens"] == records[model].prompt_tokens
        assert "moa_stream.usage_estimated" not in attrs
        assert attrs["gen_ai.response.time_to_first_chunk"] >= 0.02  # the model's fixed TTFT
        assert attrs["moa_stream.attempts"] == 1


def test_instrument_wraps_each_agent_once() -> None:
    provider = ScriptedProvider({})
    spec = moa([Agent("a", provider, "m")], Agent("b", provider, "m"), layers=2)
    once = instrument(spec)
    twice = instrument(once)
    wrapped = once.layers[0].agents[0].provider
    assert isinstance(wrapped, TracedProvider) and wrapped.inner is provider
    assert twice.layers[1].agents[0].provider is once.layers[1].agents[0].provider
    assert wrapped.name == "scripted"


NO_OTEL = """
import asyncio, sys
sys.modules["opentelemetry"] = None  # as if the extra were not installed

from moa_stream import Agent, moa
from moa_stream.testing import Script, ScriptedProvider
from moa_stream import tracing

async def main():
    provider = ScriptedProvider({"m": Script(tokens=("ok",))})
    spec = moa([Agent("a", provider, "m")], Agent("b", provider, "m"))
    assert tracing.instrument(spec) is spec
    async with tracing.traced_run(spec.stream([{"role": "user", "content": "hi"}])) as events:
        kinds = [e.type async for e in events]
    assert kinds[-1] == "run.done", kinds
    print("AVAILABLE", tracing.AVAILABLE)

asyncio.run(main())
"""


def test_no_op_without_opentelemetry() -> None:
    done = subprocess.run(
        [sys.executable, "-c", NO_OTEL], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "AVAILABLE False"
