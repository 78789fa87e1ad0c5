"""The integrations trace each chat request when a tracer provider is set, as ``serve`` does:
a request span, its upstream requests and its layers as children."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import aiohttp
import orjson
import pytest
from aiohttp import web
from fastapi import FastAPI, Request
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from starlette.responses import Response
from support.asgi import uvicorn_serving
from support.http import serve_app
from support.integrations import config
from support.requests import body
from support.tracing import memory_spans

from moa_stream._wire import parse_chat_request
from moa_stream.config import Runtime
from moa_stream.integrations.aiohttp import sse_response
from moa_stream.integrations.fastapi import moa_router


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """A global SDK tracer provider writing to memory, removed afterwards."""
    with memory_spans() as exporter:
        yield exporter


@pytest.fixture
async def runtime() -> AsyncIterator[Runtime]:
    async with Runtime(config()) as rt:
        yield rt


def children(all_spans: tuple[ReadableSpan, ...], parent: ReadableSpan) -> list[str]:
    ctx = parent.get_span_context()
    assert ctx is not None
    return sorted(
        s.name for s in all_spans if s.parent is not None and s.parent.span_id == ctx.span_id
    )


async def post(url: str, payload: dict[str, object]) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=orjson.dumps(payload)) as resp,
    ):
        assert resp.status == 200
        await resp.read()


def ancestors(all_spans: tuple[ReadableSpan, ...], span: ReadableSpan) -> list[int]:
    by_id = {s.context.span_id: s for s in all_spans}
    out = []
    parent = span.parent
    while parent is not None:
        out.append(parent.span_id)
        above = by_id.get(parent.span_id)
        parent = None if above is None else above.parent
    return out


@pytest.mark.parametrize("streamed", [True, False])
async def test_router_requests_are_traced(
    spans: InMemorySpanExporter, runtime: Runtime, streamed: bool
) -> None:
    app = FastAPI()
    app.include_router(moa_router(runtime), prefix="/moa")
    async with uvicorn_serving(app) as url:
        await post(url + "/moa/v1/chat/completions", {**body(), "stream": streamed})
    finished = spans.get_finished_spans()
    (request,) = [s for s in finished if s.name == "chat fast"]
    # A server span of its own, or (FastAPI's own endpoint span current) that span's child.
    assert request.kind == (SpanKind.SERVER if request.parent is None else SpanKind.INTERNAL)
    attributes = dict(request.attributes or {})
    assert attributes["gen_ai.request.model"] == "fast"
    assert attributes["gen_ai.usage.output_tokens"] > 0
    assert attributes["moa_stream.outcome"] == "ok"
    assert attributes["http.response.status_code"] == 200
    assert children(finished, request) == ["chat agg", "chat p-fast", "moa.layer 0"]


async def test_under_the_applications_span_the_request_is_its_child(
    spans: InMemorySpanExporter, runtime: Runtime
) -> None:
    """An application traced by its own HTTP instrumentation: the request span joins it."""
    app = FastAPI()
    tracer = trace.get_tracer("host")

    @app.middleware("http")
    async def http_span(request: Request, call_next: object) -> Response:
        with tracer.start_as_current_span("host request"):
            response: Response = await call_next(request)  # type: ignore[operator]
            return response

    app.include_router(moa_router(runtime), prefix="/moa")
    async with uvicorn_serving(app) as url:
        await post(url + "/moa/v1/chat/completions", {**body(), "stream": True})
    finished = spans.get_finished_spans()
    (host,) = [s for s in finished if s.name == "host request"]
    (request,) = [s for s in finished if s.name == "chat fast"]
    assert request.kind == SpanKind.INTERNAL
    assert request.context.trace_id == host.context.trace_id
    assert host.context.span_id in ancestors(finished, request)
    assert children(finished, request) == ["chat agg", "chat p-fast", "moa.layer 0"]


async def test_the_helpers_runs_are_traced(spans: InMemorySpanExporter, runtime: Runtime) -> None:
    """A run the application started itself: the request span and its layers (the upstream
    requests too when the MoA comes from ``tracing.instrument``)."""

    async def chat(request: web.Request) -> web.StreamResponse:
        req = parse_chat_request(await request.read())
        return await sse_response(
            request, runtime.moas[req.model].stream(req.messages), model="fast"
        )

    app = web.Application()
    app.router.add_post("/chat", chat)
    async with serve_app(app) as url:
        await post(url + "/chat", body())
    finished = spans.get_finished_spans()
    (request,) = [s for s in finished if s.name == "chat fast"]
    assert (request.attributes or {})["gen_ai.request.stream"] is True
    assert children(finished, request) == ["moa.layer 0"]
