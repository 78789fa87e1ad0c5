"""``moa-stream serve`` traces each chat request when a tracer provider is set: a request span
with a child per upstream request (proposers, aggregator, staircase steps), per layer and per
staircase step, read back from the SDK's in-memory exporter. Without one, nothing is traced."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import aiohttp
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from support.requests import CHAT, body
from support.server import Running, serving, stairs_config, stream
from support.tracing import memory_spans

from moa_stream import tracing


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """A global SDK tracer provider writing to memory, removed afterwards."""
    with memory_spans() as exporter:
        yield exporter


def children(all_spans: tuple[ReadableSpan, ...], parent: ReadableSpan) -> list[ReadableSpan]:
    ctx = parent.get_span_context()
    assert ctx is not None
    return [s for s in all_spans if s.parent is not None and s.parent.span_id == ctx.span_id]


def the_request(all_spans: tuple[ReadableSpan, ...], model: str) -> ReadableSpan:
    (span,) = [s for s in all_spans if s.name == f"chat {model}"]
    return span


async def test_a_request_is_a_span_with_its_upstream_requests_and_layers(
    spans: InMemorySpanExporter, srv: Running, session: aiohttp.ClientSession
) -> None:
    sse = await stream(session, srv.url, body())
    assert sse.status == 200
    finished = spans.get_finished_spans()
    request = the_request(finished, "fast")
    assert request.kind == SpanKind.SERVER
    assert request.parent is None
    attributes = dict(request.attributes or {})
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.request.model"] == "fast"
    assert attributes["gen_ai.usage.input_tokens"] > 0
    assert attributes["gen_ai.usage.output_tokens"] > 0
    assert attributes["gen_ai.response.finish_reasons"] == ("stop",)
    assert attributes["http.response.status_code"] == 200
    assert attributes["moa_stream.outcome"] == "ok"
    assert str(attributes["gen_ai.response.id"]).startswith("chatcmpl-")

    kids = children(finished, request)
    upstream = {s.name: s for s in kids if s.kind == SpanKind.CLIENT}
    assert set(upstream) == {"chat p-fast", "chat p-slow", "chat agg"}
    roles = {name: (s.attributes or {})["moa_stream.role"] for name, s in upstream.items()}
    assert roles == {"chat p-fast": "proposer", "chat p-slow": "proposer", "chat agg": "aggregator"}
    for span in upstream.values():
        assert (span.attributes or {})["gen_ai.usage.output_tokens"] > 0
    assert [s.name for s in kids if s.name.startswith("moa.layer")] == ["moa.layer 0"]
    # All in one trace.
    assert {s.context.trace_id for s in kids} == {request.context.trace_id}


async def test_the_request_continues_the_clients_trace(
    spans: InMemorySpanExporter, srv: Running, session: aiohttp.ClientSession
) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    parent_id = "00f067aa0ba902b7"
    headers = {"traceparent": f"00-{trace_id}-{parent_id}-01"}
    async with session.post(srv.url + CHAT, json=body(), headers=headers) as resp:
        assert resp.status == 200
    request = the_request(spans.get_finished_spans(), "fast")
    assert request.context.trace_id == int(trace_id, 16)
    assert request.parent is not None and request.parent.span_id == int(parent_id, 16)
    assert (request.attributes or {})["gen_ai.request.stream"] is False


async def test_a_failed_request_is_an_error_span(
    spans: InMemorySpanExporter, srv: Running, session: aiohttp.ClientSession
) -> None:
    async with session.post(srv.url + CHAT, json=body("agg-broken")) as resp:
        assert resp.status == 502
    finished = spans.get_finished_spans()
    request = the_request(finished, "agg-broken")
    assert request.status.status_code == StatusCode.ERROR
    assert (request.attributes or {})["http.response.status_code"] == 502
    (aggregator,) = [s for s in children(finished, request) if s.name == "chat broken"]
    assert aggregator.status.status_code == StatusCode.ERROR


async def test_staircase_steps_are_spans(spans: InMemorySpanExporter) -> None:
    async with serving(stairs_config(restarts=True)) as srv, aiohttp.ClientSession() as session:
        sse = await stream(session, srv.url, body("stairs"), headers={"X-MoA-Progress": "1"})
    assert sse.status == 200
    items = sse.progress()
    asked = [i["step"] for i in items if i["type"] == "aggregator.step"]
    rejected = [i["reason"] for i in items if i["type"] == "aggregator.step_rejected"]
    assert rejected, "the restarting aggregator's steps are rejected"
    finished = spans.get_finished_spans()
    request = the_request(finished, "stairs")
    kids = children(finished, request)
    # A rejected step's number is asked again: one span per time a step was asked, in order.
    steps = sorted((s for s in kids if s.name.startswith("moa.step ")), key=lambda s: s.start_time)
    assert [s.name for s in steps] == [f"moa.step {n}" for n in asked]
    reasons = [(s.attributes or {}).get("moa_stream.step.rejected") for s in steps]
    assert [r for r in reasons if r is not None] == rejected
    # Each step is a request to the aggregator: a client span of its own, beside the step's.
    aggregator_requests = [s for s in kids if s.name == "chat agg-restarts"]
    assert len(aggregator_requests) >= len(asked)


async def test_without_a_tracer_provider_nothing_is_traced(
    srv: Running, session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[object] = []
    monkeypatch.setattr("moa_stream.server.app.RequestTrace", lambda *a, **k: made.append(a))
    if tracing.request_tracer() is not None:
        pytest.skip("a tracer provider is set for this whole process")
    sse = await stream(session, srv.url, body())
    assert sse.status == 200
    assert made == [], "no span, no instrumented MoA, no per-event work"


SCRIPT = """
from moa_stream import tracing
tracer = tracing.request_tracer()
print("on" if tracer is not None else "off")
"""


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "off"),
        ({"OTEL_TRACES_EXPORTER": "console"}, "on"),
        ({"OTEL_TRACES_EXPORTER": "none"}, "off"),
        ({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"}, "off"),
    ],
)
def test_the_otel_environment_turns_tracing_on(env: dict[str, str], expected: str) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert out.stdout.strip().splitlines()[-1] == expected, out.stderr
