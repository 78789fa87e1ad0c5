"""What happens to a connection before a request reaches the application: limits aiohttp's
server does not have (a cap on open connections, a deadline for a request's head) and the
answer to bytes that are not HTTP.

aiohttp closes a connection that stays idle past its ``keepalive_timeout`` (the server sets it
from ``[server] keepalive_timeout``, far below aiohttp's default of an hour); that also covers a
connection that never sends a byte. What it lacks is a bound on a client that sends its headers
a byte at a time, and a bound on how many connections may be open at once: each costs a file
descriptor, and once the process runs out, ``/healthz`` and every real request fail too.

:class:`ConnectionGuard` wraps the protocol of each accepted connection (the aiohttp request
handler made by ``runner.server``) in a thin forwarding protocol: over the cap, a new
connection gets a 503 error body and is closed at once; a request head that has not fully
arrived ``header_timeout`` seconds after its first byte (or after the connection opened) gets a
408 and the connection is closed. The handlers tell the guard when a request has arrived
(:meth:`ConnectionGuard.request_started`) and when it is done.

A request aiohttp's parser rejects (a bad ``Content-Length``, headers over the size limit, a NUL
in a header, an unknown method, TLS bytes on the plain-HTTP port) never reaches the
application. aiohttp answers it with a plain-text 400 and logs the parser's exception, whose
message quotes the offending header line, at error level with a traceback: a client's own key
sent in a malformed request would land in the log. :class:`JSONErrorRequestHandler` answers
with an OpenAI-style JSON error instead and logs one warning line that names only the kind of
problem.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

import structlog
from aiohttp import http_exceptions, web

from moa_stream._wire import error_body

__all__ = ["ConnectionGuard", "JSONErrorRequestHandler"]

log = structlog.get_logger("moa_stream.server")


def _raw_response(status: str, message: str, code: str, extra: str = "") -> bytes:
    body = error_body(message, "invalid_request_error", code)
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{extra}x-should-retry: "
        f"{'true' if status.startswith('503') else 'false'}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


#: What each parser error is called in the response and the log; the first match in order.
_PARSER_PROBLEMS: tuple[tuple[type[Exception], str, str], ...] = (
    (
        http_exceptions.BadHttpMethod,
        "unknown_method",
        "The request's method is not an HTTP method. (TLS sent to a plain-HTTP port looks "
        "like this: use http://, not https://.)",
    ),
    (http_exceptions.LineTooLong, "header_too_large", "A request line or header is too long."),
    (
        http_exceptions.ContentLengthError,
        "invalid_content_length",
        "The body does not match its Content-Length.",
    ),
    (http_exceptions.InvalidHeader, "invalid_header", "A header is not valid HTTP."),
    (http_exceptions.BadStatusLine, "invalid_request_line", "The request line is not valid HTTP."),
    (http_exceptions.InvalidURLError, "invalid_url", "The request's URL is not valid."),
)


def _parser_problem(exc: BaseException | None) -> tuple[str, str]:
    for cls, code, message in _PARSER_PROBLEMS:
        if isinstance(exc, cls):
            return code, message
    return "invalid_http", "The request is not valid HTTP/1.1."


class JSONErrorRequestHandler(web.RequestHandler):
    """aiohttp's request handler with OpenAI-style JSON for the requests its parser rejects,
    logged as one warning line without the request's bytes."""

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if not isinstance(exc, http_exceptions.HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        code, text = _parser_problem(exc)
        # Only the class name: the exception's message quotes the raw header line.
        log.warning("http.bad_request", code=code, status=status, parser_error=type(exc).__name__)
        body = error_body(text, "invalid_request_error", code)
        response = web.Response(
            status=status,
            body=body,
            content_type="application/json",
            headers={"x-should-retry": "false"},
        )
        response.force_close()
        return response


class _GuardedProtocol(asyncio.Protocol):
    """Forwards every call to the request handler; keeps the head deadline and the count."""

    __slots__ = ("_busy", "_guard", "_inner", "_timer", "_transport")

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol) -> None:
        self._guard = guard
        self._inner: asyncio.Protocol | None = inner
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._busy = False

    # -- the head deadline ------------------------------------------------------------------
    def _arm(self) -> None:
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._guard.header_timeout, self._expire)

    def disarm(self, busy: bool) -> None:
        """A request arrived (``busy``) or ended: no deadline until the next byte."""
        self._busy = busy
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        transport = self._transport
        if self._busy or transport is None or transport.is_closing():
            return
        self._guard.timed_out += 1
        log.warning("connection.header_timeout", timeout_s=self._guard.header_timeout)
        transport.write(self._guard.timeout_response)
        transport.close()

    # -- asyncio.Protocol -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        guard = self._guard
        if len(guard.open) >= guard.max_connections:
            guard.refused += 1
            log.warning("connection.refused", open=len(guard.open), limit=guard.max_connections)
            self._inner = None
            transport.write(guard.refusal_response)
            transport.close()
            return
        guard.open[transport] = self
        self._arm()
        assert self._inner is not None
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._inner is None:
            return
        if self._timer is None and not self._busy:
            self._arm()
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return None if self._inner is None else self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.disarm(False)
        if self._inner is None:
            return
        if self._transport is not None:
            self._guard.open.pop(self._transport, None)
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()


class ConnectionGuard:
    """The open connections of one server process, their cap and their head deadline."""

    def __init__(self, *, max_connections: int, header_timeout: float) -> None:
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.open: dict[asyncio.BaseTransport, _GuardedProtocol] = {}
        #: Connections refused over the cap, and closed for a head that did not arrive.
        self.refused = 0
        self.timed_out = 0
        self.refusal_response = _raw_response(
            "503 Service Unavailable",
            f"The server is at its limit of {max_connections} open connections. Retry shortly.",
            "too_many_connections",
            "Retry-After: 1\r\n",
        )
        self.timeout_response = _raw_response(
            "408 Request Timeout",
            f"The request's headers did not arrive within {header_timeout:g} s.",
            "request_header_timeout",
        )

    def protocol_factory(
        self, server: web.Server, **handler_options: Any
    ) -> Callable[[], asyncio.Protocol]:
        """A protocol factory for ``loop.create_server``: a :class:`JSONErrorRequestHandler`
        of ``server`` (an aiohttp ``runner.server``) made with ``handler_options``
        (``keepalive_timeout``, ``access_log`` ...), behind the cap and the head deadline."""
        loop = asyncio.get_running_loop()

        def make() -> asyncio.Protocol:
            return _GuardedProtocol(
                self, JSONErrorRequestHandler(server, loop=loop, **handler_options)
            )

        return make

    def request_started(self, transport: asyncio.BaseTransport | None) -> None:
        """A whole request head arrived on ``transport``: its deadline is met."""
        conn = self.open.get(transport) if transport is not None else None
        if conn is not None:
            conn.disarm(True)

    def request_finished(self, transport: asyncio.BaseTransport | None) -> None:
        """The request on ``transport`` is done; the next one's first byte starts a deadline."""
        conn = self.open.get(transport) if transport is not None else None
        if conn is not None:
            conn.disarm(False)
