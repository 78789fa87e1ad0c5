"""OpenTelemetry spans for MoA runs: one per run, one per layer, one per upstream request.

Two pieces, neither of which the engine knows about:

- :func:`instrument` returns a copy of a MoA whose agents' providers are wrapped
  (:class:`TracedProvider`): every upstream request becomes a ``chat {model}`` client span with
  the GenAI semantic-convention attributes (``gen_ai.request.model``,
  ``gen_ai.usage.input_tokens`` / ``output_tokens``, ``gen_ai.response.finish_reasons``,
  ``gen_ai.response.time_to_first_chunk`` ...).
- :func:`traced_run` enters a run under a ``moa.run {name}`` span and hands back its events;
  it opens a ``moa.layer {i}`` span per layer from the run's own events (start at the layer's
  first proposer, end at its decision, with the reason and the references kept) and puts the
  run's totals (tokens, TTFT, time to quorum, aggregator) on the run span.

The run span is the current span while the run is entered and read, so the upstream spans of
its proposers and aggregator are its children (asyncio tasks inherit the context they were
created in). ::

    moa = instrument(spec)
    async with traced_run(moa.stream(messages)) as events:
        async for event in events:
            ...

Without OpenTelemetry installed (``pip install 'moa_stream[otel]'``) both are no-ops:
:func:`instrument` returns the MoA unchanged and :func:`traced_run` the run's plain events. With
the API but no SDK configured, spans are OpenTelemetry's own no-op spans. Per streamed chunk the
wrapper adds one ``try`` and one attribute test; nothing is recorded per token.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Self

from moa_stream._types import ChatRequest, Delta
from moa_stream.engine.events import (
    AggregatorDelta,
    AggregatorFailed,
    Event,
    LayerDone,
    ProposerDelta,
    ProposerFailed,
    ProposerStarted,
)
from moa_stream.engine.run import MoARun
from moa_stream.engine.spec import Agent, MoA
from moa_stream.engine.streams import StreamWrapper
from moa_stream.providers import Provider, ProviderStream

try:
    from opentelemetry import context as otel_context
    from opentelemetry import trace
except ImportError:  # pragma: no cover - exercised in a subprocess without the extra
    trace = None  # type: ignore[assignment]
    otel_context = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer

__all__ = ["AVAILABLE", "TracedProvider", "instrument", "traced_run"]

#: Whether OpenTelemetry is installed; without it everything here is a no-op.
AVAILABLE = trace is not None

_INSTRUMENTATION = "moa_stream"


def _tracer(tracer: Tracer | None) -> Tracer:
    # Looked up at call time, so that a tracer provider configured after import is used.
    return tracer if tracer is not None else trace.get_tracer(_INSTRUMENTATION)


def _error_type(exc: BaseException) -> str:
    kind = getattr(exc, "kind", None)
    return kind if isinstance(kind, str) else type(exc).__qualname__


def _fail(span: Span, exc: BaseException) -> None:
    """Mark ``span`` as ended by ``exc``: a cancellation is an outcome, not an error."""
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        span.set_attribute("moa_stream.outcome", "cancelled")
        return
    span.set_attribute("error.type", _error_type(exc))
    span.record_exception(exc)
    span.set_status(trace.StatusCode.ERROR, str(exc))


class TracedProvider:
    """A provider whose every stream is a ``chat {model}`` client span (see the module
    docstring). ``agent`` names the agent the requests are for (``gen_ai.agent.name``)."""

    def __init__(self, inner: Provider, *, tracer: Tracer | None = None, agent: str | None = None):
        self.inner = inner
        self.agent = agent
        self._tracer = tracer

    @property
    def name(self) -> str:
        return self.inner.name

    def stream(self, request: ChatRequest) -> ProviderStream:
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": self.inner.name,
            "gen_ai.request.model": request.model,
            "gen_ai.request.stream": True,
        }
        if self.agent is not None:
            attributes["gen_ai.agent.name"] = self.agent
        if request.temperature is not None:
            attributes["gen_ai.request.temperature"] = request.temperature
        if request.max_tokens is not None:
            attributes["gen_ai.request.max_tokens"] = request.max_tokens
        if request.stop:
            attributes["gen_ai.request.stop_sequences"] = list(request.stop)
        span = _tracer(self._tracer).start_span(
            f"chat {request.model}", kind=trace.SpanKind.CLIENT, attributes=attributes
        )
        try:
            inner = self.inner.stream(request)
        except BaseException as exc:
            _fail(span, exc)
            span.end()
            raise
        return _TracedStream(inner, span)

    async def prewarm(self) -> None:
        await self.inner.prewarm()

    async def aclose(self) -> None:
        await self.inner.aclose()


class _TracedStream(StreamWrapper):
    """The wrapped stream: ends its span with the stream's usage, finish reason and TTFT."""

    __slots__ = ("_ended", "_first_token", "_span", "_started")

    def __init__(self, inner: ProviderStream, span: Span) -> None:
        super().__init__(inner)
        self._span = span
        self._ended = False
        self._started = time.monotonic()
        self._first_token: float | None = None

    async def __aenter__(self) -> Self:
        try:
            await self._inner.__aenter__()
        except BaseException as exc:
            self._end(exc)
            raise
        return self

    async def __anext__(self) -> Delta:
        try:
            delta = await self._inner.__anext__()
        except StopAsyncIteration:
            self._end(None)
            raise
        except BaseException as exc:
            self._end(exc)
            raise
        if self._first_token is None and delta.content:
            self._first_token = time.monotonic()
        return delta

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            # Closed before its end: the caller no longer wanted it (a cancelled straggler).
            if not self._ended:
                self._span.set_attribute("moa_stream.outcome", "cancelled")
            self._end(None)

    def _end(self, exc: BaseException | None) -> None:
        if self._ended:
            return
        self._ended = True
        span = self._span
        inner = self._inner
        usage = inner.usage
        if usage is not None:
            span.set_attribute("gen_ai.usage.input_tokens", usage.prompt_tokens)
            span.set_attribute("gen_ai.usage.output_tokens", usage.completion_tokens)
            if usage.estimated:
                span.set_attribute("moa_stream.usage_estimated", True)
        if inner.finish_reason is not None:
            span.set_attribute("gen_ai.response.finish_reasons", [inner.finish_reason])
        timings = inner.timings
        ttft = timings.ttft
        if ttft is None and self._first_token is not None:
            ttft = self._first_token - self._started
        if ttft is not None:
            span.set_attribute("gen_ai.response.time_to_first_chunk", ttft)
        if timings.attempts:
            span.set_attribute("moa_stream.attempts", timings.attempts)
        if exc is not None:
            _fail(span, exc)
        span.end()


def _traced_agent(agent: Agent, tracer: Tracer | None) -> Agent:
    if isinstance(agent.provider, TracedProvider):
        return agent
    return replace(agent, provider=TracedProvider(agent.provider, tracer=tracer, agent=agent.name))


def instrument(moa: MoA, *, tracer: Tracer | None = None) -> MoA:
    """A copy of ``moa`` whose upstream requests are traced (unchanged without OpenTelemetry).

    The providers are wrapped, not replaced: closing the original providers (or the
    :class:`~moa_stream.config.Runtime` that owns them) still releases everything.
    """
    if not AVAILABLE:
        return moa
    layers = tuple(
        replace(layer, agents=tuple(_traced_agent(a, tracer) for a in layer.agents))
        for layer in moa.layers
    )
    return replace(
        moa,
        layers=layers,
        aggregator=_traced_agent(moa.aggregator, tracer),
        fallbacks=tuple(_traced_agent(a, tracer) for a in moa.fallbacks),
    )


@contextlib.asynccontextmanager
async def traced_run(
    run: MoARun, *, tracer: Tracer | None = None
) -> AsyncGenerator[AsyncIterator[Event], None]:
    """Enter ``run`` under a run span and yield its events (see the module docstring).

    Use it instead of ``async with run``; consume the events it yields (once). On exit the run
    is closed and its span ended with the run's totals; an error that leaves the block is
    recorded on the span.
    """
    if not AVAILABLE:
        async with run:
            yield run.events()
        return
    tracer = _tracer(tracer)
    spec = run.spec
    span = tracer.start_span(
        f"moa.run {spec.name}",
        attributes={
            "gen_ai.operation.name": "invoke_workflow",
            "gen_ai.workflow.name": spec.name,
            "moa_stream.layers": len(spec.layers),
        },
    )
    token = otel_context.attach(trace.set_span_in_context(span))
    origin_ns = time.time_ns()
    observer: AsyncGenerator[Event, None] | None = None
    try:
        async with run:
            observer = _observe(run.events(), span, tracer, origin_ns)
            try:
                yield observer
            finally:
                await observer.aclose()
    except BaseException as exc:
        _fail(span, exc)
        raise
    finally:
        otel_context.detach(token)
        _report(span, run)
        span.end()


def _report(span: Span, run: MoARun) -> None:
    report = run.report
    span.set_attribute("gen_ai.usage.input_tokens", report.usage.prompt_tokens)
    span.set_attribute("gen_ai.usage.output_tokens", report.usage.completion_tokens)
    if report.ttft_s is not None:
        span.set_attribute("gen_ai.response.time_to_first_chunk", report.ttft_s)
    if report.time_to_quorum_s is not None:
        span.set_attribute("moa_stream.time_to_quorum_s", report.time_to_quorum_s)
    if report.aggregator is not None:
        span.set_attribute("moa_stream.aggregator", report.aggregator)
    if report.finish_reason is not None:
        span.set_attribute("gen_ai.response.finish_reasons", [report.finish_reason])
    span.set_attribute("moa_stream.layers_run", len(report.layers))


async def _observe(
    events: AsyncIterator[Event], run_span: Span, tracer: Tracer, origin_ns: int
) -> AsyncGenerator[Event, None]:
    """Pass every event on; open and close the layer spans from them."""
    parent = trace.set_span_in_context(run_span)
    layers: dict[int, Span] = {}

    def at(t: float) -> int:
        return origin_ns + int(t * 1e9)

    try:
        async for event in events:
            # The token events first and cheaply: they are nearly all of a run's events.
            if isinstance(event, AggregatorDelta | ProposerDelta):
                yield event
                continue
            if isinstance(event, ProposerStarted):
                if event.layer not in layers:
                    layers[event.layer] = tracer.start_span(
                        f"moa.layer {event.layer}",
                        context=parent,
                        start_time=at(event.t),
                        attributes={"moa_stream.layer": event.layer},
                    )
            elif isinstance(event, LayerDone):
                layer_span = layers.pop(event.layer, None)
                if layer_span is not None:
                    refs = event.references
                    layer_span.set_attribute("moa_stream.layer.reason", event.reason)
                    layer_span.set_attribute(
                        "moa_stream.layer.complete", sum(r.status == "complete" for r in refs)
                    )
                    layer_span.set_attribute(
                        "moa_stream.layer.partial", sum(r.status == "partial" for r in refs)
                    )
                    layer_span.set_attribute(
                        "moa_stream.layer.failed", sum(r.status == "failed" for r in refs)
                    )
                    if event.cut is not None:
                        layer_span.set_attribute("moa_stream.layer.cut", event.cut)
                    if event.agreement is not None:
                        layer_span.set_attribute("moa_stream.layer.agreement", event.agreement)
                    layer_span.end(end_time=at(event.t))
            elif isinstance(event, ProposerFailed | AggregatorFailed):
                run_span.add_event(
                    event.type,
                    {"gen_ai.agent.name": event.agent, "error.type": event.kind},
                    timestamp=at(event.t),
                )
            yield event
    finally:
        # A run that ended inside a layer (an error, the caller leaving).
        for layer_span in layers.values():
            layer_span.set_attribute("moa_stream.outcome", "cancelled")
            layer_span.end()
