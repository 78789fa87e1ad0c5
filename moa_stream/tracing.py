"""OpenTelemetry spans for MoA runs: one per run, one per layer, one per upstream request, one
per staircase step; and for a server, one per chat request.

Two pieces, neither of which the engine knows about:

- :func:`instrument` returns a copy of a MoA whose agents' providers are wrapped
  (:class:`TracedProvider`): every upstream request becomes a ``chat {model}`` client span with
  the GenAI semantic-convention attributes (``gen_ai.request.model``,
  ``gen_ai.usage.input_tokens`` / ``output_tokens``, ``gen_ai.response.finish_reasons``,
  ``gen_ai.response.time_to_first_chunk`` ...).
- :func:`traced_run` enters a run under a ``moa.run {name}`` span and hands back its events;
  it opens a ``moa.layer {i}`` span per layer from the run's own events (start at the layer's
  first proposer, end at its decision, with the reason and the references kept) and a
  ``moa.step {n}`` span per staircase step, and puts the run's totals (tokens, TTFT, time to
  quorum, aggregator) on the run span.

The run span is the current span while the run is entered and read, so the upstream spans of
its proposers and aggregator are its children (asyncio tasks inherit the context they were
created in). ::

    moa = instrument(spec)
    async with traced_run(moa.stream(messages)) as events:
        async for event in events:
            ...

Servers (``moa-stream serve``, :mod:`moa_stream.integrations`) trace each chat request with a
:class:`RequestTrace` whenever :func:`request_tracer` finds a tracer provider: set by the
application, by ``opentelemetry-instrument``, or from the standard ``OTEL_*`` variables
(:func:`configure_from_env`, at the first request). Its ``chat {model}`` span has the run's
upstream requests, layers and staircase steps as children. Without a provider nothing of this
runs: no span, no instrumented MoA, nothing per event.

Without OpenTelemetry installed (``pip install 'moa_stream[otel]'``) both are no-ops:
:func:`instrument` returns the MoA unchanged and :func:`traced_run` the run's plain events. With
the API but no SDK configured, spans are OpenTelemetry's own no-op spans. Per streamed chunk the
wrapper adds one ``try`` and one attribute test; nothing is recorded per token.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import replace
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Literal, Self

import structlog

from moa_stream._types import ChatRequest, Delta, sampling_fields
from moa_stream.engine.events import (
    AggregatorDelta,
    AggregatorFailed,
    AggregatorStep,
    AggregatorStepRejected,
    Event,
    LayerDone,
    ProposerDelta,
    ProposerFailed,
    ProposerStarted,
    RunReport,
)
from moa_stream.engine.run import MoARun
from moa_stream.engine.spec import Agent, MoA
from moa_stream.engine.streams import StreamWrapper
from moa_stream.providers import Provider, ProviderStream

try:
    from opentelemetry import context as otel_context
    from opentelemetry import propagate, trace
except ImportError:  # pragma: no cover - exercised in a subprocess without the extra
    trace = None  # type: ignore[assignment]
    otel_context = None  # type: ignore[assignment]
    propagate = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer

__all__ = [
    "AVAILABLE",
    "RequestTrace",
    "TracedProvider",
    "configure_from_env",
    "instrument",
    "request_tracer",
    "traced_run",
]

log = structlog.get_logger("moa_stream.tracing")

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

    def __init__(
        self,
        inner: Provider,
        *,
        tracer: Tracer | None = None,
        agent: str | None = None,
        role: Literal["proposer", "aggregator"] | None = None,
    ):
        self.inner = inner
        self.agent = agent
        self.role = role
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
        if self.role is not None:
            attributes["moa_stream.role"] = self.role
        attributes.update(
            sampling_fields(
                request,
                temperature="gen_ai.request.temperature",
                max_tokens="gen_ai.request.max_tokens",
                stop="gen_ai.request.stop_sequences",
            )
        )
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


def _traced_agent(
    agent: Agent, tracer: Tracer | None, role: Literal["proposer", "aggregator"]
) -> Agent:
    if isinstance(agent.provider, TracedProvider):
        return agent
    provider = TracedProvider(agent.provider, tracer=tracer, agent=agent.name, role=role)
    return replace(agent, provider=provider)


def instrument(moa: MoA, *, tracer: Tracer | None = None) -> MoA:
    """A copy of ``moa`` whose upstream requests are traced (unchanged without OpenTelemetry).

    The providers are wrapped, not replaced: closing the original providers (or the
    :class:`~moa_stream.config.Runtime` that owns them) still releases everything.
    """
    if not AVAILABLE:
        return moa
    layers = tuple(
        replace(layer, agents=tuple(_traced_agent(a, tracer, "proposer") for a in layer.agents))
        for layer in moa.layers
    )
    return replace(
        moa,
        layers=layers,
        aggregator=_traced_agent(moa.aggregator, tracer, "aggregator"),
        fallbacks=tuple(_traced_agent(a, tracer, "aggregator") for a in moa.fallbacks),
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
    _report_attributes(span, run.report)


def _report_attributes(span: Span, report: RunReport) -> None:
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


class _RunSpans:
    """The spans a run's events make under ``parent``: one per layer (from its first proposer
    to its decision) and one per staircase step (from its request to the next step's, its
    rejection or the run's end). Fed every event but the token events."""

    __slots__ = ("_context", "_layers", "_origin_ns", "_parent", "_step", "_tracer")

    def __init__(self, parent: Span, tracer: Tracer, origin_ns: int) -> None:
        self._parent = parent
        self._context = trace.set_span_in_context(parent)
        self._tracer = tracer
        self._origin_ns = origin_ns
        self._layers: dict[int, Span] = {}
        self._step: tuple[int, Span] | None = None

    def _at(self, t: float) -> int:
        return self._origin_ns + int(t * 1e9)

    def event(self, event: Event) -> None:
        if isinstance(event, ProposerStarted):
            if event.layer not in self._layers:
                self._layers[event.layer] = self._tracer.start_span(
                    f"moa.layer {event.layer}",
                    context=self._context,
                    start_time=self._at(event.t),
                    attributes={"moa_stream.layer": event.layer},
                )
        elif isinstance(event, LayerDone):
            layer_span = self._layers.pop(event.layer, None)
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
                layer_span.end(end_time=self._at(event.t))
        elif isinstance(event, AggregatorStep):
            self._end_step(event.t)
            span = self._tracer.start_span(
                f"moa.step {event.step}",
                context=self._context,
                start_time=self._at(event.t),
                attributes={
                    "gen_ai.agent.name": event.agent,
                    "moa_stream.step": event.step,
                    "moa_stream.step.continuation": event.continuation,
                    "moa_stream.step.final": event.final,
                    "moa_stream.step.answer_chars": event.answer_chars,
                    "moa_stream.step.references": len(event.references),
                },
            )
            self._step = (event.step, span)
        elif isinstance(event, AggregatorStepRejected):
            if self._step is not None and self._step[0] == event.step:
                self._step[1].set_attribute("moa_stream.step.rejected", event.reason)
                self._end_step(event.t)
        elif isinstance(event, ProposerFailed | AggregatorFailed):
            self._parent.add_event(
                event.type,
                {"gen_ai.agent.name": event.agent, "error.type": event.kind},
                timestamp=self._at(event.t),
            )

    def _end_step(self, t: float | None) -> None:
        if self._step is not None:
            self._step[1].end(end_time=None if t is None else self._at(t))
            self._step = None

    def close(self) -> None:
        """End what is still open: a step runs to the end of the run; a layer still open
        was cut short (an error, the caller leaving)."""
        self._end_step(None)
        for layer_span in self._layers.values():
            layer_span.set_attribute("moa_stream.outcome", "cancelled")
            layer_span.end()
        self._layers.clear()


async def _observe(
    events: AsyncIterator[Event], run_span: Span, tracer: Tracer, origin_ns: int
) -> AsyncGenerator[Event, None]:
    """Pass every event on; open and close the layer and step spans from them."""
    spans = _RunSpans(run_span, tracer, origin_ns)
    try:
        async for event in events:
            # The token events first and cheaply: they are nearly all of a run's events.
            if not isinstance(event, AggregatorDelta | ProposerDelta):
                spans.event(event)
            yield event
    finally:
        spans.close()


# -- the requests of a server -------------------------------------------------------------------

_env_checked = False
_cached_tracer: tuple[object, Tracer] | None = None
#: Instrumented copies of the MoAs a server serves, by id (the original kept, so that the id
#: is not reused while the entry lives).
_instrumented: dict[int, tuple[MoA, MoA]] = {}

_OTLP_ENDPOINTS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


def configure_from_env(environ: Mapping[str, str] | None = None) -> bool:
    """Set up the OpenTelemetry SDK from the standard ``OTEL_*`` variables; True if it did.

    Only when nothing set a tracer provider before (the application, ``opentelemetry-instrument``)
    and the variables ask for traces: ``OTEL_TRACES_EXPORTER`` names the exporters (``otlp``,
    ``console`` ..., as the SDK's entry points ``opentelemetry_traces_exporter`` know them;
    ``none`` turns tracing off), or, without it, an ``OTEL_EXPORTER_OTLP_ENDPOINT`` or
    ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` means ``otlp``. ``OTEL_SDK_DISABLED=true`` turns it
    off. The SDK reads the rest itself (``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``,
    ``OTEL_TRACES_SAMPLER``, the exporters' endpoints and headers); the service is named
    ``moa-stream`` unless they name it.
    """
    if not AVAILABLE:
        return False
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    names = env.get("OTEL_TRACES_EXPORTER")
    if names is None and any(env.get(name) for name in _OTLP_ENDPOINTS):
        names = "otlp"
    wanted = [n.strip() for n in (names or "").split(",") if n.strip()]
    if not wanted or wanted == ["none"]:
        return False
    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        return False  # set up already, by someone who knows better
    try:
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning(
            "tracing.no_sdk",
            exporters=wanted,
            hint="OTEL_TRACES_EXPORTER is set but the OpenTelemetry SDK is not installed: "
            "pip install opentelemetry-sdk (and the exporter's package)",
        )
        return False
    exporters = []
    for name in wanted:
        found = entry_points(group="opentelemetry_traces_exporter", name=name)
        if not found:
            log.warning("tracing.unknown_exporter", exporter=name)
            continue
        exporters.append(next(iter(found)).load()())
    if not exporters:
        return False
    named = "OTEL_SERVICE_NAME" in env or "service.name=" in env.get("OTEL_RESOURCE_ATTRIBUTES", "")
    provider = TracerProvider(
        resource=Resource.create({} if named else {SERVICE_NAME: "moa-stream"})
    )
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    log.info("tracing.configured", exporters=wanted)
    return True


def request_tracer() -> Tracer | None:
    """The tracer of a server's request spans, or None while tracing is off: OpenTelemetry is
    not installed, or no tracer provider is set (by the application, ``opentelemetry-instrument``
    or, at the first call, :func:`configure_from_env`). Cheap enough to ask per request."""
    global _env_checked, _cached_tracer
    if not AVAILABLE:
        return None
    if not _env_checked:
        _env_checked = True
        configure_from_env()
    provider = trace.get_tracer_provider()
    if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
        return None
    cached = _cached_tracer
    if cached is None or cached[0] is not provider:
        cached = _cached_tracer = (provider, provider.get_tracer(_INSTRUMENTATION))
    return cached[1]


def _instrumented_copy(moa: MoA) -> MoA:
    hit = _instrumented.get(id(moa))
    if hit is not None and hit[0] is moa:
        return hit[1]
    if len(_instrumented) >= 256:
        _instrumented.clear()
    traced = instrument(moa)
    _instrumented[id(moa)] = (moa, traced)
    return traced


class RequestTrace:
    """The spans of one chat request to a server (``moa-stream serve``, the integrations).

    ``chat {model}``, the request span, has as children a ``chat {upstream model}`` span per
    upstream request (a proposer, the aggregator, each staircase step's request; with the MoA
    from :meth:`instrument`), a ``moa.layer {i}`` span per layer and a ``moa.step {n}`` span
    per staircase step. It is a ``server`` span continuing the client's ``traceparent``,
    unless a span is current already (the application's HTTP instrumentation): then it is
    that span's child.

    The caller creates the run from :meth:`instrument`'s MoA, enters it between :meth:`attach`
    and :meth:`detach` (so that its requests' spans are children), hands :meth:`event` every
    event but the token events (nothing is done per token) and calls :meth:`end` once.
    """

    __slots__ = ("_runs", "_token", "span")

    def __init__(
        self,
        tracer: Tracer,
        model: str,
        *,
        headers: Mapping[str, str] | None = None,
        stream: bool | None = None,
        response_id: str | None = None,
        start_ns: int | None = None,
    ) -> None:
        context = None
        kind = trace.SpanKind.INTERNAL
        if not trace.get_current_span().get_span_context().is_valid:
            kind = trace.SpanKind.SERVER
            if headers is not None:
                context = propagate.extract(headers)
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.request.model": model,
            "gen_ai.response.model": model,
        }
        if stream is not None:
            attributes["gen_ai.request.stream"] = stream
        if response_id is not None:
            attributes["gen_ai.response.id"] = response_id
        self.span = tracer.start_span(
            f"chat {model}", context=context, kind=kind, start_time=start_ns, attributes=attributes
        )
        self._runs = _RunSpans(self.span, tracer, time.time_ns())
        self._token: object | None = None

    @staticmethod
    def instrument(moa: MoA) -> MoA:
        """``moa`` with its upstream requests traced (a copy made once per MoA)."""
        return _instrumented_copy(moa)

    def attach(self) -> None:
        """Make the request span the current span (of this task and the tasks it starts)."""
        if self._token is None:
            self._token = otel_context.attach(trace.set_span_in_context(self.span))

    def detach(self) -> None:
        """Undo :meth:`attach` (in the same task)."""
        if self._token is not None:
            otel_context.detach(self._token)  # type: ignore[arg-type]
            self._token = None

    def event(self, event: Event) -> None:
        """One of the run's events (not ``aggregator.delta`` nor ``proposer.delta``)."""
        self._runs.event(event)

    def end(
        self,
        report: RunReport | None = None,
        *,
        outcome: str | None = None,
        status: int | None = None,
        error_type: str | None = None,
        error: str | None = None,
    ) -> None:
        """End the request span with the run's totals (``report``) and how it ended: its
        ``outcome`` word, HTTP ``status`` and, for an error of the server's or the
        upstreams' (5xx), ``error_type`` and its message."""
        span = self.span
        self._runs.close()
        if report is not None:
            _report_attributes(span, report)
        if outcome is not None:
            span.set_attribute("moa_stream.outcome", outcome)
        if status:
            span.set_attribute("http.response.status_code", status)
        if error_type is not None:
            span.set_attribute("error.type", error_type)
            if status is None or status >= 500:
                span.set_status(trace.StatusCode.ERROR, error)
        span.end()
