"""The OpenAI-compatible MoA server: the aiohttp application and its handlers.

``create_app(runtime)`` exposes every ``[moa.<id>]`` of a started
:class:`~moa_stream.config.Runtime` as a model:

- ``POST /v1/chat/completions``: streamed (SSE) or not; the MoA's aggregator writes the answer.
- ``GET /v1/models`` and ``GET /v1/models/{id}``: the MoA ids.
- ``GET /healthz``: 200 while serving, 503 while draining for shutdown.
- ``GET /readyz``: 200 when a load balancer should send requests; 503 while starting or
  draining.
- ``GET /metrics``: Prometheus text.

When a stream's headers go out: at its first answer token (together with the role chunk and
that token), so a run that fails before answering still gets a real error status (502) that
clients and their retry logic understand. A client that asks for progress (or for it as
``reasoning_content``) gets the headers at once, because the progress is what it wants to see
meanwhile. ``docs/server.md`` has the details.

The handlers stay short: :mod:`moa_stream.server.respond` makes a chat request's response
parts (its options, headers, stream and whole completion; the app integrations use the same
module), :class:`~moa_stream.server.stream.StreamWriter` maps a run's events to bytes (pure),
and :meth:`MoAServer._guarded` owns the deadline, its registration for shutdown and the mapping
of failures to the client's error, for streamed and whole answers alike.

A client that disconnects cancels its handler (``handler_cancellation=True`` on the runner),
and leaving the run's ``async with`` cancels every upstream request of that run at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hmac
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import aiohttp
import orjson
import structlog
from aiohttp import web

from moa_stream._exceptions import MoAError
from moa_stream._probe import hint_for
from moa_stream._wire import model_objects
from moa_stream.config import Runtime, ServerConfig
from moa_stream.engine.events import Event
from moa_stream.engine.run import MoARun
from moa_stream.engine.spec import MoA
from moa_stream.server._connections import ConnectionGuard
from moa_stream.server.errors import (
    APIError,
    as_json_error,
    clip,
    from_http_exception,
    from_moa_error,
    quote,
    timeout_error,
)
from moa_stream.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from moa_stream.server.metrics import ServerMetrics
from moa_stream.server.playground import add_playground_routes
from moa_stream.server.respond import (
    DEGRADED_HEADER,
    PROGRESS_HEADER,
    PROGRESS_TEXT,
    REASONING_HEADER,
    REQUEST_ID_HEADER,
    Answer,
    ResponseSink,
    collect,
    parse_chat,
    progress_level,
    pump,
    truthy_header,
)
from moa_stream.server.stream import StreamWriter
from moa_stream.tracing import RequestTrace, request_tracer

__all__ = [
    "DEGRADED_HEADER",
    "PROGRESS_HEADER",
    "PROGRESS_TEXT",
    "REASONING_HEADER",
    "MoAServer",
    "create_app",
    "progress_level",
    "truthy_header",
]

log = structlog.get_logger("moa_stream.server")

_JSON = "application/json"
_CHAT_PATH = "/v1/chat/completions"
_TOKEN = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
_ALWAYS_ALLOWED_HEADERS = ("Authorization", "Content-Type", PROGRESS_HEADER, REASONING_HEADER)
_QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


class RequestContext:
    """What one request did, gathered for its log line and its metrics."""

    __slots__ = (
        "answered",
        "chat",
        "chunk_times",
        "completion_id",
        "created",
        "degraded",
        "error",
        "first_token_at",
        "hint",
        "model",
        "outcome",
        "progress",
        "request_id",
        "run",
        "started",
        "status",
        "steps",
        "stream",
        "trace",
    )

    def __init__(self, request_id: str, started: float) -> None:
        self.request_id = request_id
        self.started = started
        self.completion_id = f"chatcmpl-{request_id}"
        self.created = int(time.time())
        self.chat = False
        self.model: str | None = None
        self.stream: bool | None = None
        self.progress = False
        self.status = 0
        self.outcome: str | None = None
        self.error: APIError | None = None
        self.first_token_at: float | None = None
        self.run: MoARun | None = None
        self.degraded = False
        #: The whole answer, through ``[DONE]``, was handed to the transport. What happens
        #: afterwards (the run's clean-up, the client hanging up as curl and the SDKs do at
        #: the end of a stream) cannot make the request anything but the answer it was.
        self.answered = False
        #: When each answer chunk was written (monotonic), for the inter-token metrics.
        self.chunk_times: list[float] = []
        #: Staircase steps asked.
        self.steps = 0
        #: The request's spans, while tracing is on.
        self.trace: RequestTrace | None = None
        #: The config field to check after a failure (see :func:`moa_stream._probe.hint_for`).
        self.hint: str | None = None

    def fail(self, error: APIError) -> None:
        """Record ``error`` as the request's result."""
        self.error = error
        self.outcome = error.outcome


_CTX = web.RequestKey("moa_stream.context", RequestContext)
#: An ``Expect`` header this server cannot meet, left by :func:`expect_handler` for the
#: middleware to refuse (as JSON, logged and counted like every other error).
_UNMET_EXPECT = web.RequestKey("moa_stream.unmet_expect", str)


async def expect_handler(request: web.Request) -> None:
    """The ``Expect`` handler of every route: ``100-continue`` as aiohttp does; anything else
    is noted for the middleware instead of aiohttp's own text/plain 417, which it writes
    before any middleware runs (so with no request log line and not as an OpenAI error)."""
    if request.version != aiohttp.HttpVersion11:
        return  # HTTP/1.0 has no Expect; aiohttp ignores it there too
    expect = request.headers.get("Expect", "")
    if expect.lower() != "100-continue":
        request[_UNMET_EXPECT] = expect
        return
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    # The interim response is not part of the response's own size.
    request.writer.output_size = 0


class MoAServer:
    """The state behind the handlers: the runtime's MoAs, keys, limits and metrics.

    One per application; :func:`create_app` builds it and stores it as ``app[MoAServer.KEY]``.
    """

    KEY: web.AppKey[MoAServer]

    def __init__(
        self,
        moas: Mapping[str, MoA],
        config: ServerConfig,
        *,
        descriptions: Mapping[str, str] | None = None,
        metrics: ServerMetrics | None = None,
    ) -> None:
        self.moas = dict(moas)
        self.config = config
        self.metrics = metrics if metrics is not None else ServerMetrics()
        #: What to check in the config after a failed run (logged, never sent to the client).
        self.hint: Callable[[BaseException], str | None] | None = None
        self._keys = tuple(k.encode() for k in config.resolved_api_keys())
        self._origins = frozenset(config.cors_origins)
        #: Where the application is mounted as a sub-application ("" at the root); the
        #: middleware matches paths after it.
        self.path_prefix = ""
        self.active = 0
        self.shutting_down = False
        #: A drain has begun: ``/readyz`` answers 503 and responses close their connections,
        #: while requests are still served (see :meth:`begin_drain`).
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._expired = False
        self._timeouts: set[asyncio.Timeout] = set()
        #: Open connections, when they are accepted through :meth:`listen`.
        self.connections = ConnectionGuard(
            max_connections=config.max_connections, header_timeout=config.header_timeout
        )
        # Agent name -> provider name, per MoA id: proposer.failed events carry the agent only.
        self._providers = {
            moa_id: {agent.name: agent.provider.name for agent in spec.agents}
            for moa_id, spec in self.moas.items()
        }
        self._model_objects = model_objects(self.moas, descriptions)
        self._models_body = orjson.dumps(
            {"object": "list", "data": list(self._model_objects.values())}
        )

    # -- shutdown ----------------------------------------------------------------------------
    def begin_drain(self) -> None:
        """Report not ready (``/readyz`` 503) and close each connection after its response,
        but go on serving: a load balancer's health checks take this server out before it
        stops accepting (:meth:`begin_shutdown`)."""
        self.draining = True

    def begin_shutdown(self) -> None:
        """Refuse new chat requests (503) and report unhealthy; running ones go on."""
        self.draining = True
        self.shutting_down = True

    async def drain(self, grace: float) -> bool:
        """Wait up to ``grace`` seconds for running requests to finish; True if they all did.

        Those still running afterwards are ended: a stream gets a ``shutting_down`` error frame
        and ``[DONE]``, a non-streamed request a 503.
        """
        try:
            async with asyncio.timeout(grace):
                await self._idle.wait()
            return True
        except TimeoutError:
            pass
        self._expired = True
        now = asyncio.get_running_loop().time()
        for cm in list(self._timeouts):
            cm.reschedule(now)
        return False

    async def wait_idle(self) -> None:
        """Wait until no chat request is running."""
        await self._idle.wait()

    # -- helpers -----------------------------------------------------------------------------
    def authorized(self, header: str | None) -> bool:
        """Whether the ``Authorization`` header carries a configured key (always, if none is).

        Compared in constant time against every key, so the time taken reveals neither how
        much of a key matched nor which key it was.
        """
        if not self._keys:
            return True
        if header is None:
            return False
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer":
            return False
        try:
            given = token.strip().encode()
        except UnicodeEncodeError:
            # aiohttp keeps undecodable header bytes as surrogates; no key is made of those.
            return False
        ok = False
        for key in self._keys:
            ok |= hmac.compare_digest(given, key)
        return ok

    def origin_allowed(self, origin: str) -> bool:
        """Whether ``cors_origins`` lets a page from ``origin`` call the API."""
        return "*" in self._origins or origin in self._origins

    def _count_failure(self, moa_id: str, agent: str, kind: str) -> None:
        provider = self._providers[moa_id].get(agent, "unknown")
        self.metrics.upstream_errors.inc(provider, kind)

    async def _read_body(self, request: web.Request) -> bytes:
        limit = self.config.max_body_bytes
        # Refuse on the declared length before reading a byte; chunked bodies are capped by
        # the application's client_max_size while they are read.
        if request.content_length is not None and request.content_length > limit:
            raise APIError.body_too_large(limit)
        try:
            async with asyncio.timeout(self.config.body_timeout):
                return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise APIError.body_too_large(limit) from None
        except TimeoutError:
            # The rest of the body may never come: the connection cannot be reused.
            raise APIError.body_timeout(self.config.body_timeout) from None

    # -- handlers ----------------------------------------------------------------------------
    async def healthz(self, request: web.Request) -> web.Response:
        """``GET /healthz``: 200 while serving, 503 while draining (load balancers move on)."""
        if self.shutting_down:
            return web.Response(status=503, body=b'{"status":"shutting_down"}', content_type=_JSON)
        return web.Response(body=b'{"status":"ok"}', content_type=_JSON)

    async def readyz(self, request: web.Request) -> web.Response:
        """``GET /readyz``: 200 when requests are welcome; 503 once the server drains, so that
        a load balancer sends them elsewhere. (While it starts, :func:`~moa_stream.server.serve`
        answers 503 ``starting`` itself: this application exists once its runtime does.)"""
        if self.draining:
            return web.Response(status=503, body=b'{"status":"draining"}', content_type=_JSON)
        return web.Response(body=b'{"status":"ready"}', content_type=_JSON)

    async def metrics_handler(self, request: web.Request) -> web.Response:
        """``GET /metrics``: the Prometheus text of :attr:`metrics`."""
        response = web.Response(body=self.metrics.render())
        response.headers["Content-Type"] = METRICS_CONTENT_TYPE
        return response

    async def list_models(self, request: web.Request) -> web.Response:
        """``GET /v1/models``: one model object per MoA id (built once)."""
        return web.Response(body=self._models_body, content_type=_JSON)

    async def get_model(self, request: web.Request) -> web.Response:
        """``GET /v1/models/{id}``: one MoA's model object, or 404."""
        model_id = request.match_info["model"]
        obj = self._model_objects.get(model_id)
        if obj is None:
            raise APIError.model_not_found(model_id, list(self.moas))
        return web.Response(body=orjson.dumps(obj), content_type=_JSON)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/chat/completions``: run the MoA named by ``model``, streamed or not."""
        ctx = request[_CTX]
        if self.shutting_down:
            raise APIError.shutting_down()
        raw = await self._read_body(request)
        req, options = parse_chat(raw, request.headers)
        spec = self.moas.get(req.model)
        if spec is None:
            raise APIError.model_not_found(req.model, list(self.moas))
        ctx.model = req.model
        ctx.stream = req.stream
        ctx.progress = options.progress
        if not options.reasoning and self._reasoning_by_default(req.model):
            options = dataclasses.replace(options, reasoning=True)
        if self.active >= self.config.max_concurrent_streams:
            raise APIError.too_many_streams(self.config.max_concurrent_streams)
        self.active += 1
        self._idle.clear()
        self.metrics.active_streams.inc()
        tracer = request_tracer()
        if tracer is not None:
            ctx.trace = RequestTrace(
                tracer,
                req.model,
                headers=request.headers,
                stream=req.stream,
                response_id=ctx.completion_id,
                start_ns=time.time_ns() - int((time.monotonic() - ctx.started) * 1e9),
            )
            ctx.trace.attach()  # the run's requests, started in this task, are its children
            spec = ctx.trace.instrument(spec)
        try:
            run = spec.stream(
                req.messages, temperature=req.temperature, max_tokens=req.max_tokens, stop=req.stop
            )
            answer = Answer(
                req.model,
                options,
                include_usage=req.include_usage,
                request_id=ctx.request_id,
                created=ctx.created,
            )
            if req.stream:
                return await self._stream(request, ctx, answer, run)
            return await self._complete(ctx, answer, run)
        finally:
            if ctx.trace is not None:
                ctx.trace.detach()
            self.active -= 1
            self.metrics.active_streams.dec()
            if self.active == 0:
                self._idle.set()

    def _reasoning_by_default(self, model: str) -> bool:
        chosen = self.config.reasoning_progress
        return "*" in chosen or model in chosen

    def _deadline_error(self) -> APIError:
        return (
            APIError.shutting_down()
            if self._expired
            else timeout_error(self.config.request_timeout)
        )

    def _observe(self, ctx: RequestContext, event: Event) -> None:
        """Count a failed agent request in the metrics (by its provider and error kind) and a
        staircase step; hand the event to the request's trace (token events excepted)."""
        if event.type == "proposer.delta" or event.type == "aggregator.delta":
            return
        model = ctx.model or "unknown"
        if event.type == "proposer.failed" or event.type == "aggregator.failed":
            self._count_failure(model, event.agent, event.kind)
        elif event.type == "aggregator.step":
            ctx.steps += 1
        elif event.type == "aggregator.step_rejected":
            self.metrics.staircase_rejected.inc(model, event.reason)
        if ctx.trace is not None:
            ctx.trace.event(event)

    @contextlib.asynccontextmanager
    async def _guarded(self, ctx: RequestContext, model: str) -> AsyncIterator[None]:
        """Around the consumption of one run: the request's deadline (registered, so that the
        end of a shutdown's grace period can expire it) and the mapping of whatever ends the
        run early to the error the client gets, recorded in ``ctx.error``.

        A client gone mid-write sets ``ctx.outcome`` instead; cancellation passes through.
        """
        deadline = asyncio.timeout(self.config.request_timeout)
        try:
            async with deadline:
                self._timeouts.add(deadline)
                yield
        except MoAError as exc:
            # A failed agent request was counted at its *.failed event, which the engine emits
            # before it raises.
            ctx.fail(from_moa_error(exc))
            if self.hint is not None:
                ctx.hint = self.hint(exc)
        except TimeoutError:
            ctx.fail(self._deadline_error())
        except ConnectionResetError:
            # The client went away while we wrote; leaving the run's block cancels the run.
            # After the answer's end it had everything: the request stays an answered one.
            if not ctx.answered:
                ctx.outcome = "client_disconnected"
                ctx.status = 499
        except Exception:
            # A bug: the log gets the traceback; the client an error it can act on.
            log.exception("request.crashed", request_id=ctx.request_id)
            ctx.fail(APIError.internal())
        finally:
            self._timeouts.discard(deadline)

    async def _stream(
        self, request: web.Request, ctx: RequestContext, answer: Answer, run: MoARun
    ) -> web.StreamResponse:
        resp = web.StreamResponse()
        sink = ResponseSink(request, resp)
        writer = answer.writer()
        finished = False
        async with run:
            ctx.run = run
            async with self._guarded(ctx, answer.model):
                finished = await self._write_events(ctx, answer, run, writer, sink)
            ctx.degraded = ctx.degraded or writer.degraded
            if ctx.outcome == "client_disconnected":
                return resp
            # Written before the run is closed, like the tail: closing may wait for stragglers.
            error = ctx.error
            if error is None and not (finished or ctx.answered):
                log.error("stream.ended_without_report", request_id=ctx.request_id)
                error = APIError.internal()
            if error is not None:
                if not resp.prepared:
                    raise error
                ctx.fail(error)
                with contextlib.suppress(ConnectionResetError):
                    await resp.write(writer.error(error))
                    await resp.write_eof()
        return resp

    async def _write_events(
        self,
        ctx: RequestContext,
        answer: Answer,
        run: MoARun,
        writer: StreamWriter,
        sink: ResponseSink,
    ) -> bool:
        """Write the stream of ``run``'s events; True once the run's tail is written."""

        def first_token() -> None:
            ctx.first_token_at = time.monotonic()

        def answered() -> None:
            ctx.answered = True

        return await pump(
            answer,
            run,
            writer,
            sink,
            observe=functools.partial(self._observe, ctx),
            chunk_times=ctx.chunk_times,
            on_first_token=first_token,
            on_answered=answered,
        )

    async def _complete(self, ctx: RequestContext, answer: Answer, run: MoARun) -> web.Response:
        report = None
        async with run:
            ctx.run = run
            async with self._guarded(ctx, answer.model):
                report = await collect(run, functools.partial(self._observe, ctx))
        if ctx.error is not None:
            raise ctx.error
        if report is None:
            log.error("run.ended_without_report", request_id=ctx.request_id)
            raise APIError.internal()
        headers, body = answer.completion(report)
        ctx.degraded = ctx.degraded or DEGRADED_HEADER in headers
        return web.Response(body=body, headers=headers)

    # -- middleware and signals -------------------------------------------------------------
    def _preflight(self, request: web.Request) -> web.Response:
        origin = request.headers.get("Origin", "")
        if not self.origin_allowed(origin):
            raise APIError(
                403,
                f"Browser requests from the origin {quote(origin)} are not allowed. Allow it "
                f"with 'moa-stream serve --cors-origin {clip(origin)}' or in [server] "
                "cors_origins.",
                code="cors_origin_not_allowed",
                outcome="forbidden",
            )
        requested = request.headers.get("Access-Control-Request-Headers", "")
        names = [h.strip() for h in requested.split(",") if h.strip()]
        # Browser SDKs add their own headers (x-stainless-*); the origin check is the guard.
        # Header names are case-insensitive: list each once, however the browser spelled it.
        allowed: dict[str, str] = {}
        for name in (*_ALWAYS_ALLOWED_HEADERS, *(h for h in names if _TOKEN.match(h))):
            allowed.setdefault(name.lower(), name)
        return web.Response(
            status=204,
            headers={
                "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
                "Access-Control-Allow-Headers": ", ".join(allowed.values()),
                "Access-Control-Max-Age": "600",
            },
        )

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Request id, preflight, authentication, errors as OpenAI error bodies, and the
        request's log line and metrics, around every handler."""
        ctx = RequestContext(uuid.uuid4().hex, time.monotonic())
        # Counted as a chat request even when refused before the handler (401, 405).
        path = request.path.removeprefix(self.path_prefix)
        ctx.chat = path == _CHAT_PATH
        request[_CTX] = ctx
        response: web.StreamResponse
        try:
            self.connections.request_started(request.transport)
            if (
                request.method == "OPTIONS"
                and "Origin" in request.headers
                and "Access-Control-Request-Method" in request.headers
            ):
                response = self._preflight(request)
            elif _UNMET_EXPECT in request:
                raise APIError.expectation_failed(request[_UNMET_EXPECT])
            elif path.startswith("/v1/") and not self.authorized(
                request.headers.get("Authorization")
            ):
                raise APIError.invalid_api_key()
            else:
                response = await handler(request)
        except APIError as exc:
            ctx.fail(exc)
            response = exc.response()
        except web.HTTPException as exc:
            err = from_http_exception(exc, request.path)
            ctx.fail(err)
            response = err.response()
        except asyncio.CancelledError:
            if ctx.answered:
                # Cancelled after the answer went out whole: the client hung up at the end of
                # the stream (curl and the SDKs do) while the run was still closing (a
                # staircase cancels, or waits for, its proposers only after run.done).
                ctx.outcome = ctx.outcome or "ok"
                ctx.status = ctx.status or 200
            else:
                ctx.outcome = "shutting_down" if self._expired else "client_disconnected"
                ctx.status = 499  # nginx's "client closed request"; nothing was sent with it
            self._finish(request, ctx)
            raise
        except Exception:
            log.exception("request.crashed", request_id=ctx.request_id, path=clip(request.path))
            err = APIError.internal()
            ctx.fail(err)
            response = err.response()
        if not ctx.status:
            ctx.status = response.status
        self._finish(request, ctx)
        return response

    async def on_response_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        """Adds ``x-request-id`` and the CORS headers to every response, streamed ones too
        (a middleware would be too late for a response already prepared)."""
        ctx = request.get(_CTX)
        if ctx is not None:
            response.headers[REQUEST_ID_HEADER] = ctx.request_id
        if self.draining:
            # A connection kept alive would carry the next request to a server about to stop.
            # The header too: aiohttp has written its own by the time this signal runs.
            response.force_close()
            response.headers["Connection"] = "close"
        if isinstance(response, web.Response):
            # Errors aiohttp writes without the middleware (an unmet Expect on an unknown
            # path): the same OpenAI error body as every other.
            as_json_error(response)
        origin = request.headers.get("Origin")
        if origin and self._origins and self.origin_allowed(origin):
            response.headers["Access-Control-Allow-Origin"] = (
                "*" if "*" in self._origins else origin
            )
            response.headers["Access-Control-Expose-Headers"] = REQUEST_ID_HEADER
            if "*" not in self._origins:
                response.headers["Vary"] = "Origin"

    def _finish(self, request: web.Request, ctx: RequestContext) -> None:
        """The request's one log line and its metrics."""
        self.connections.request_finished(request.transport)
        now = time.monotonic()
        if ctx.outcome is None:
            ctx.outcome = "ok" if ctx.status < 400 else "error"
        fields: dict[str, Any] = {
            "request_id": ctx.request_id,
            "method": request.method,
            # Client-supplied: bounded, like everything of the client's a line carries.
            "path": clip(request.path),
            "status": ctx.status,
            "outcome": ctx.outcome,
            "duration_s": round(now - ctx.started, 4),
        }
        if ctx.chat:
            model = ctx.model or "unknown"
            m = self.metrics
            m.requests.inc(model, ctx.outcome)
            m.duration.observe(now - ctx.started, model)
            fields["model"] = ctx.model
            fields["stream"] = ctx.stream
            if ctx.progress:
                fields["progress"] = True
            if ctx.first_token_at is not None:
                ttft = ctx.first_token_at - ctx.started
                m.ttft.observe(ttft, model)
                fields["ttft_s"] = round(ttft, 4)
            m.observe_chunks(model, ctx.chunk_times)
            if ctx.steps:
                m.staircase_steps.observe(ctx.steps, model)
            if ctx.run is not None:
                report = ctx.run.report
                m.observe_report(model, report)
                if report.time_to_quorum_s is not None:
                    fields["time_to_quorum_s"] = round(report.time_to_quorum_s, 4)
                fields["run_total_s"] = round(report.total_s, 4)
                fields["aggregator"] = report.aggregator
                fields["prompt_tokens"] = report.usage.prompt_tokens
                fields["completion_tokens"] = report.usage.completion_tokens
            if ctx.trace is not None:
                error = ctx.error
                ctx.trace.end(
                    None if ctx.run is None else ctx.run.report,
                    outcome=ctx.outcome,
                    status=ctx.status,
                    error_type=None if error is None else error.code or error.outcome,
                    error=None if error is None else error.message,
                )
                ctx.trace = None
        if ctx.degraded:
            fields["degraded"] = True
        if ctx.error is not None:
            fields["error_code"] = ctx.error.code
            fields["error"] = ctx.error.message
        if ctx.hint:
            fields["hint"] = ctx.hint
        if request.path.removeprefix(self.path_prefix) in _QUIET_PATHS and ctx.status < 400:
            log.debug("request", **fields)
        else:
            log.info("request", **fields)


MoAServer.KEY = web.AppKey("moa_stream.server", MoAServer)


def create_app(
    runtime: Runtime,
    server_config: ServerConfig | None = None,
    *,
    metrics: ServerMetrics | None = None,
) -> web.Application:
    """The aiohttp application serving ``runtime``'s MoAs under their ids.

    ``runtime`` must be started (``async with Runtime(config) as runtime``); the application
    does not close it. ``server_config`` defaults to the runtime's ``[server]`` table. Run the
    application with ``web.AppRunner(app, handler_cancellation=True)`` (as
    :func:`moa_stream.server.serve` does) so that a client's disconnect cancels its run.
    """
    config = server_config if server_config is not None else runtime.config.server
    descriptions = {moa_id: m.description for moa_id, m in runtime.config.moas.items()}
    state = MoAServer(runtime.moas, config, descriptions=descriptions, metrics=metrics)
    # A run that failed on a config mistake (a refused connection, a 404, a refused key) logs
    # the field to check, as `chat` and `demo` say it.
    state.hint = functools.partial(hint_for, config=runtime.config)
    return build_app(state)


def build_app(state: MoAServer) -> web.Application:
    """The application around an existing :class:`MoAServer`."""
    app = web.Application(
        middlewares=[state.middleware], client_max_size=state.config.max_body_bytes
    )
    app[MoAServer.KEY] = state
    app.on_response_prepare.append(state.on_response_prepare)
    expect = expect_handler
    app.router.add_post(_CHAT_PATH, state.chat_completions, expect_handler=expect)
    app.router.add_get("/v1/models", state.list_models, expect_handler=expect)
    app.router.add_get("/v1/models/{model}", state.get_model, expect_handler=expect)
    app.router.add_get("/healthz", state.healthz, expect_handler=expect)
    app.router.add_get("/readyz", state.readyz, expect_handler=expect)
    app.router.add_get("/metrics", state.metrics_handler, expect_handler=expect)
    if state.config.ui:
        add_playground_routes(app.router, expect_handler=expect)
    return app
