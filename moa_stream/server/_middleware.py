"""Around every request of the server: its id, CORS, authentication, errors as OpenAI error
bodies, and its one log line and metrics.

:class:`RequestMiddleware` is the application's middleware and its ``on_response_prepare``
signal; the handlers stay unaware of all of it, and record what they did in the request's
:class:`~moa_stream.server._context.RequestContext`.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import structlog
from aiohttp import web

from moa_stream.server._context import CHAT_PATH, CONTEXT, UNMET_EXPECT, RequestContext
from moa_stream.server.errors import APIError, as_json_error, clip, from_http_exception, quote
from moa_stream.server.respond import PROGRESS_HEADER, REASONING_HEADER, REQUEST_ID_HEADER

if TYPE_CHECKING:
    from moa_stream.server.app import MoAServer

__all__ = ["RequestMiddleware"]

log = structlog.get_logger("moa_stream.server")

_TOKEN = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
_ALWAYS_ALLOWED_HEADERS = ("Authorization", "Content-Type", PROGRESS_HEADER, REASONING_HEADER)
_QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class RequestMiddleware:
    """The middleware and response signal of one server's application."""

    def __init__(self, state: MoAServer) -> None:
        self.state = state

    @web.middleware
    async def middleware(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        """Request id, preflight, authentication, errors as OpenAI error bodies, and the
        request's log line and metrics, around every handler."""
        state = self.state
        ctx = RequestContext(uuid.uuid4().hex, time.monotonic())
        # Counted as a chat request even when refused before the handler (401, 405).
        path = request.path.removeprefix(state.path_prefix)
        ctx.chat = path == CHAT_PATH
        request[CONTEXT] = ctx
        response: web.StreamResponse
        try:
            state.connections.request_started(request.transport)
            if (
                request.method == "OPTIONS"
                and "Origin" in request.headers
                and "Access-Control-Request-Method" in request.headers
            ):
                response = self._preflight(request)
            elif UNMET_EXPECT in request:
                raise APIError.expectation_failed(request[UNMET_EXPECT])
            elif path.startswith("/v1/") and not state.authorized(
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
                ctx.outcome = "shutting_down" if state.expired else "client_disconnected"
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

    def _preflight(self, request: web.Request) -> web.Response:
        origin = request.headers.get("Origin", "")
        if not self.state.origin_allowed(origin):
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

    async def on_response_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        """Adds ``x-request-id`` and the CORS headers to every response, streamed ones too
        (a middleware would be too late for a response already prepared)."""
        ctx = request.get(CONTEXT)
        if ctx is not None:
            response.headers[REQUEST_ID_HEADER] = ctx.request_id
        if self.state.draining:
            # A connection kept alive would carry the next request to a server about to stop.
            # The header too: aiohttp has written its own by the time this signal runs.
            response.force_close()
            response.headers["Connection"] = "close"
        if isinstance(response, web.Response):
            # Errors aiohttp writes without the middleware (an unmet Expect on an unknown
            # path): the same OpenAI error body as every other.
            as_json_error(response)
        allow = self.state.cors_allow_origin(request.headers.get("Origin"))
        if allow is not None:
            response.headers["Access-Control-Allow-Origin"] = allow
            response.headers["Access-Control-Expose-Headers"] = REQUEST_ID_HEADER
            if allow != "*":
                response.headers["Vary"] = "Origin"

    def _finish(self, request: web.Request, ctx: RequestContext) -> None:
        """The request's one log line and its metrics."""
        state = self.state
        state.connections.request_finished(request.transport)
        now = time.monotonic()
        if ctx.outcome is None:
            ctx.outcome = "ok" if ctx.status < 400 else "error"
        outcome = ctx.outcome
        fields: dict[str, Any] = {
            "request_id": ctx.request_id,
            "method": request.method,
            # Client-supplied: bounded, like everything of the client's a line carries.
            "path": clip(request.path),
            "status": ctx.status,
            "outcome": outcome,
            "duration_s": round(now - ctx.started, 4),
        }
        if ctx.chat:
            self._finish_chat(ctx, outcome, now, fields)
        if ctx.degraded:
            fields["degraded"] = True
        if ctx.error is not None:
            fields["error_code"] = ctx.error.code
            fields["error"] = ctx.error.message
        if ctx.hint:
            fields["hint"] = ctx.hint
        if request.path.removeprefix(state.path_prefix) in _QUIET_PATHS and ctx.status < 400:
            log.debug("request", **fields)
        else:
            log.info("request", **fields)

    def _finish_chat(
        self, ctx: RequestContext, outcome: str, now: float, fields: dict[str, Any]
    ) -> None:
        """A chat request's metrics, its fields of the log line, and the end of its trace."""
        model = ctx.model or "unknown"
        m = self.state.metrics
        m.requests.inc(model, outcome)
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
                outcome=outcome,
                status=ctx.status,
                error_type=None if error is None else error.code or error.outcome,
                error=None if error is None else error.message,
            )
            ctx.trace = None
