"""The OpenAI-compatible MoA server: the aiohttp application, its state and its chat route.

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

The pieces: :class:`MoAServer` is the state every part shares (the MoAs, keys, limits,
metrics, the requests running and the shutdown); :class:`ChatRoute` is the chat handler;
the other routes are :class:`~moa_stream.server._routes.InfoRoutes`, and what happens around
every request (its id, CORS, authentication, error bodies, its log line and metrics) is
:class:`~moa_stream.server._middleware.RequestMiddleware`. The chat handler stays short:
:mod:`moa_stream.server.respond` makes a chat request's response parts (its options, headers,
stream and whole completion; the app integrations use the same module),
:class:`~moa_stream.server.stream.StreamWriter` maps a run's events to bytes (pure), and
:meth:`ChatRoute._guarded` owns the deadline, its registration for shutdown and the mapping of
failures to the client's error, for streamed and whole answers alike.

A client that disconnects cancels its handler (``handler_cancellation=True`` on the runner),
and leaving the run's ``async with`` cancels every upstream request of that run at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hmac
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping

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
from moa_stream.server._context import CHAT_PATH, CONTEXT, RequestContext, expect_handler
from moa_stream.server._middleware import RequestMiddleware
from moa_stream.server._routes import InfoRoutes
from moa_stream.server.errors import APIError, from_moa_error, timeout_error
from moa_stream.server.metrics import ServerMetrics
from moa_stream.server.playground import add_playground_routes
from moa_stream.server.respond import (
    DEGRADED_HEADER,
    PROGRESS_HEADER,
    PROGRESS_TEXT,
    REASONING_HEADER,
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
    "ChatRoute",
    "MoAServer",
    "build_app",
    "create_app",
    "progress_level",
    "truthy_header",
]

log = structlog.get_logger("moa_stream.server")


class MoAServer:
    """The state behind the handlers: the runtime's MoAs, keys, limits and metrics, the chat
    requests running, and the shutdown.

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
        #: The model object of each MoA id, as ``/v1/models`` lists them.
        self.model_objects = model_objects(self.moas, descriptions)

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

    @property
    def expired(self) -> bool:
        """A shutdown's grace period is over: requests still running were ended by it."""
        return self._expired

    # -- the chat requests running -----------------------------------------------------------
    @contextlib.contextmanager
    def admitted(self) -> Iterator[None]:
        """One chat request, counted as running while in the block: refused (429) when
        ``max_concurrent_streams`` run already; :meth:`drain` waits for the count to be 0."""
        if self.active >= self.config.max_concurrent_streams:
            raise APIError.too_many_streams(self.config.max_concurrent_streams)
        self.active += 1
        self._idle.clear()
        self.metrics.active_streams.inc()
        try:
            yield
        finally:
            self.active -= 1
            self.metrics.active_streams.dec()
            if self.active == 0:
                self._idle.set()

    @contextlib.asynccontextmanager
    async def deadline(self) -> AsyncIterator[None]:
        """A request's deadline (``request_timeout``; :class:`TimeoutError` when it passes),
        registered so that the end of a shutdown's grace period expires it at once."""
        deadline = asyncio.timeout(self.config.request_timeout)
        try:
            async with deadline:
                self._timeouts.add(deadline)
                yield
        finally:
            self._timeouts.discard(deadline)

    def count_failure(self, moa_id: str, agent: str, kind: str) -> None:
        """Count a failed agent request by its provider and error kind."""
        provider = self._providers[moa_id].get(agent, "unknown")
        self.metrics.upstream_errors.inc(provider, kind)

    # -- access ------------------------------------------------------------------------------
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

    def cors_allow_origin(self, origin: str | None) -> str | None:
        """The ``Access-Control-Allow-Origin`` of a response to a page from ``origin``: ``*``
        when every origin is allowed, else the origin itself; ``None`` when no CORS header is
        due (no origin, none configured, or not this one)."""
        if not (origin and self._origins and self.origin_allowed(origin)):
            return None
        return "*" if "*" in self._origins else origin


MoAServer.KEY = web.AppKey("moa_stream.server", MoAServer)


class ChatRoute:
    """``POST /v1/chat/completions`` of one server: run the MoA named by ``model`` and answer
    with its stream or its whole completion."""

    def __init__(self, state: MoAServer) -> None:
        self.state = state

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/chat/completions``: run the MoA named by ``model``, streamed or not."""
        state = self.state
        ctx = request[CONTEXT]
        if state.shutting_down:
            raise APIError.shutting_down()
        raw = await self._read_body(request)
        req, options = parse_chat(raw, request.headers)
        spec = state.moas.get(req.model)
        if spec is None:
            raise APIError.model_not_found(req.model, list(state.moas))
        ctx.model = req.model
        ctx.stream = req.stream
        ctx.progress = options.progress
        if not options.reasoning and self._reasoning_by_default(req.model):
            options = dataclasses.replace(options, reasoning=True)
        with state.admitted():
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
                    req.messages,
                    temperature=req.temperature,
                    max_tokens=req.max_tokens,
                    stop=req.stop,
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

    async def _read_body(self, request: web.Request) -> bytes:
        config = self.state.config
        limit = config.max_body_bytes
        # Refuse on the declared length before reading a byte; chunked bodies are capped by
        # the application's client_max_size while they are read.
        if request.content_length is not None and request.content_length > limit:
            raise APIError.body_too_large(limit)
        try:
            async with asyncio.timeout(config.body_timeout):
                return await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise APIError.body_too_large(limit) from None
        except TimeoutError:
            # The rest of the body may never come: the connection cannot be reused.
            raise APIError.body_timeout(config.body_timeout) from None

    def _reasoning_by_default(self, model: str) -> bool:
        chosen = self.state.config.reasoning_progress
        return "*" in chosen or model in chosen

    def _deadline_error(self) -> APIError:
        if self.state.expired:
            return APIError.shutting_down()
        return timeout_error(self.state.config.request_timeout)

    def _observe(self, ctx: RequestContext, event: Event) -> None:
        """Count a failed agent request in the metrics (by its provider and error kind) and a
        staircase step; hand the event to the request's trace (token events excepted)."""
        if event.type == "proposer.delta" or event.type == "aggregator.delta":
            return
        model = ctx.model or "unknown"
        if event.type == "proposer.failed" or event.type == "aggregator.failed":
            self.state.count_failure(model, event.agent, event.kind)
        elif event.type == "aggregator.step":
            ctx.steps += 1
        elif event.type == "aggregator.step_rejected":
            self.state.metrics.staircase_rejected.inc(model, event.reason)
        if ctx.trace is not None:
            ctx.trace.event(event)

    @contextlib.asynccontextmanager
    async def _guarded(self, ctx: RequestContext) -> AsyncIterator[None]:
        """Around the consumption of one run: the request's deadline (registered, so that the
        end of a shutdown's grace period can expire it) and the mapping of whatever ends the
        run early to the error the client gets, recorded in ``ctx.error``.

        A client gone mid-write sets ``ctx.outcome`` instead; cancellation passes through.
        """
        try:
            async with self.state.deadline():
                yield
        except MoAError as exc:
            # A failed agent request was counted at its *.failed event, which the engine emits
            # before it raises.
            ctx.fail(from_moa_error(exc))
            if self.state.hint is not None:
                ctx.hint = self.state.hint(exc)
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

    async def _stream(
        self, request: web.Request, ctx: RequestContext, answer: Answer, run: MoARun
    ) -> web.StreamResponse:
        resp = web.StreamResponse()
        sink = ResponseSink(request, resp)
        writer = answer.writer()
        finished = False
        async with run:
            ctx.run = run
            async with self._guarded(ctx):
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
            async with self._guarded(ctx):
                report = await collect(run, functools.partial(self._observe, ctx))
        if ctx.error is not None:
            raise ctx.error
        if report is None:
            log.error("run.ended_without_report", request_id=ctx.request_id)
            raise APIError.internal()
        headers, body = answer.completion(report)
        ctx.degraded = ctx.degraded or DEGRADED_HEADER in headers
        return web.Response(body=body, headers=headers)


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
    around = RequestMiddleware(state)
    app = web.Application(
        middlewares=[around.middleware], client_max_size=state.config.max_body_bytes
    )
    app[MoAServer.KEY] = state
    app.on_response_prepare.append(around.on_response_prepare)
    expect = expect_handler
    app.router.add_post(CHAT_PATH, ChatRoute(state).handle, expect_handler=expect)
    InfoRoutes(state).add_to(app.router, expect)
    if state.config.ui:
        add_playground_routes(app.router, expect_handler=expect)
    return app
