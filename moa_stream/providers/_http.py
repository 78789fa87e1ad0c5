"""One HTTP attempt of a streamed completion over aiohttp, and the pool it runs on.

:class:`ResponseReader` sends one request, waits for its headers and reads its event stream,
bounded by the connect, first-token, idle and total deadlines; the wire format is a
:class:`EventParser`'s business, retries the caller's (:mod:`moa_stream.providers._retry`).
:class:`Endpoint` is the frozen description of where requests go, and :class:`ConnectionPool`
the provider's keep-alive session.

This module is the single place where transport errors are translated: no aiohttp, OS,
``asyncio.TimeoutError`` or orjson exception leaves it, only
:class:`~moa_stream.ProviderError` subclasses (chained with ``raise ... from``),
:class:`~moa_stream.UsageError` and ``CancelledError``.
"""

from __future__ import annotations

import asyncio
import collections
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Final, Protocol

import aiohttp
import orjson
import yarl

from moa_stream._exceptions import (
    AuthenticationError,
    ConnectError,
    ConnectTimeout,
    ContextLengthError,
    FirstTokenTimeout,
    IdleTimeout,
    ModelNotFoundError,
    ProtocolError,
    ProviderClosedError,
    ProviderError,
    ProviderTimeout,
    RateLimitError,
    RequestRejectedError,
    ServerError,
    StreamInterruptedError,
    TotalTimeout,
    TruncatedStreamError,
    UsageError,
)
from moa_stream._resource import AsyncResource
from moa_stream._secrets import MAX_UPSTREAM_ID_CHARS, clean, mask_secrets
from moa_stream._types import Delta, StreamTimings, Usage
from moa_stream._wire import parse_retry_after
from moa_stream.providers._chunks import (
    MAX_ERROR_CHARS,
    Done,
    context_length_error,
    error_fields,
)
from moa_stream.providers._policy import RetryPolicy, Timeouts
from moa_stream.providers.sse import SSEDecoder, SSEEvent

__all__ = ["ConnectionPool", "Endpoint", "EventParser", "ResponseReader"]

_INF: Final = math.inf
_monotonic = time.monotonic
_current_task = asyncio.current_task

#: Upper bound on an error response body kept for its message.
_ERROR_BODY_LIMIT: Final = 64 * 1024
#: How long a finished stream waits for the end of the HTTP body after its last event. Reading
#: the body to its end lets the connection go back to the pool; servers end it right after the
#: last event, and a server that doesn't costs at most this much.
_DRAIN_GRACE: Final = 0.1
#: A connection handed back to the pool longer ago than this is not counted as idle: servers
#: close idle keep-alive connections on their own schedule (uvicorn after 5 s by default).
_IDLE_TRUST: Final = 4.0


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Everything a stream needs to know about its provider, fixed when the provider is built.

    ``url`` receives the POST; ``headers`` go with it (the credentials among them, hence kept
    out of ``repr``); ``secret`` is masked in every error message. ``sleep`` and ``rng`` are the
    retry back-off's sleep and jitter source, injectable for tests.
    """

    name: str
    url: yarl.URL | None = None
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    timeouts: Timeouts = field(default_factory=Timeouts)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    secret: str | None = field(default=None, repr=False)
    sleep: Callable[[float], Awaitable[None]] = field(default=asyncio.sleep, repr=False)
    rng: Callable[[], float] = field(default=random.random, repr=False)

    def redact(self, text: str) -> str:
        """``text`` with the secret, if any, masked."""
        secret = self.secret
        if not secret:
            return text
        masked = mask_secrets(text, (secret,))
        return text if masked == text else masked

    def clean(self, text: str, limit: int = MAX_UPSTREAM_ID_CHARS) -> str:
        """An upstream-supplied string (a header, an id, an error field) as it may reach a
        client or a log: the secret masked, then cut to ``limit``. An upstream that echoes the
        key in its ``x-request-id`` must not get it into a 502 body or a progress item."""
        return clean(text, (self.secret,) if self.secret else (), limit)


class EventParser(Protocol):
    """A wire format's reading of one response: stateful across the events of that response.

    ``data`` takes the data of an unnamed event (the hot path of OpenAI streams); ``event``
    any other :class:`SSEEvent`; ``completion`` a whole JSON body, for servers that answered a
    streamed request with a non-streamed one. Each returns a :class:`Delta`, :data:`DONE` at
    the end of the answer, or ``None`` for an event that carries nothing for the caller; they
    raise :class:`~moa_stream.ProviderError` subclasses only.
    """

    def data(self, data: str) -> Delta | Done | None: ...

    def event(self, event: SSEEvent) -> Delta | Done | None: ...

    def completion(self, body: bytes) -> Delta: ...


# -- the pool ----------------------------------------------------------------------------------


def _keeps_alive(resp: aiohttp.ClientResponse) -> bool:
    """Whether a response read to its end leaves its connection open for the next request."""
    headers = resp.headers
    if resp.version is not None and tuple(resp.version) < (1, 1):
        return False
    if headers.get("Connection", "").lower() == "close":
        return False
    # A body without a length ends when the server closes the connection.
    return "Content-Length" in headers or "chunked" in headers.get("Transfer-Encoding", "")


class ConnectionPool:
    """A provider's aiohttp session, created on first use inside the running loop.

    Also counts the keep-alive connections it holds idle, for prewarming: aiohttp has no public
    count, so the pool keeps its own: a response read to its end and released adds one, a
    request that reuses a pooled connection takes one. The count can be too high (a server may
    close an idle connection unseen), never so much that a prewarm is skipped for long: a
    connection is trusted for a few seconds only.
    """

    __slots__ = ("_closed", "_idle_since", "_limit", "_loop", "_session")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        # When each connection counted idle was handed back, oldest first.
        self._idle_since: collections.deque[float] = collections.deque()

    @property
    def closed(self) -> bool:
        return self._closed

    def session(self) -> aiohttp.ClientSession:
        """The session; raises :class:`~moa_stream.UsageError` after ``aclose()`` or when used
        from another event loop than the first."""
        if self._closed:
            raise ProviderClosedError("the provider is closed")
        loop = asyncio.get_running_loop()
        session = self._session
        if session is None:
            trace = aiohttp.TraceConfig()
            trace.on_request_headers_sent.append(_on_request_headers_sent)
            trace.on_connection_reuseconn.append(self._on_connection_reuse)
            # Our own timeouts bound every wait; aiohttp's would only race them.
            session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._limit),
                timeout=aiohttp.ClientTimeout(total=None, connect=None, sock_read=None),
                trace_configs=[trace],
            )
            self._session = session
            self._loop = loop
        elif self._loop is not loop:
            raise UsageError(
                "the provider was first used in another event loop; create one per loop"
            )
        return session

    def release(self, resp: aiohttp.ClientResponse) -> None:
        """Hand a response read to its end back: its connection goes back to the pool."""
        resp.release()
        if _keeps_alive(resp):
            self._idle_since.append(_monotonic())

    def idle_connections(self) -> int:
        """Keep-alive connections released recently and not taken since."""
        idle = self._idle_since
        horizon = _monotonic() - _IDLE_TRUST
        while idle and idle[0] < horizon:
            idle.popleft()
        return len(idle)

    async def aclose(self) -> None:
        self._closed = True
        self._idle_since.clear()
        session, self._session = self._session, None
        if session is not None and not session.closed:
            await session.close()

    async def _on_connection_reuse(
        self,
        session: aiohttp.ClientSession,
        ctx: SimpleNamespace,
        params: aiohttp.TraceConnectionReuseconnParams,
    ) -> None:
        if self._idle_since:
            # aiohttp hands out the most recently released connection first.
            self._idle_since.pop()
        reader = ctx.trace_request_ctx
        if isinstance(reader, ResponseReader):
            reader.reused = True


async def _on_request_headers_sent(
    session: aiohttp.ClientSession,
    ctx: SimpleNamespace,
    params: aiohttp.TraceRequestHeadersSentParams,
) -> None:
    reader = ctx.trace_request_ctx
    if isinstance(reader, ResponseReader):
        reader.on_request_sent()


# -- the watchdog ------------------------------------------------------------------------------


class PooledHTTPProvider(AsyncResource):
    """What every HTTP provider is besides its wire format: a name, an API root, a frozen
    :class:`Endpoint` and a :class:`ConnectionPool` that ``aclose()`` closes. Subclasses set
    the four attributes in ``__init__`` and add ``stream()`` and ``prewarm()``."""

    _name: str
    _base_url: yarl.URL
    _endpoint: Endpoint
    _pool: ConnectionPool

    @property
    def name(self) -> str:
        """The provider's name in errors, logs and metrics."""
        return self._name

    @property
    def base_url(self) -> str:
        """The API root requests are sent under."""
        return str(self._base_url)

    @property
    def timeouts(self) -> Timeouts:
        return self._endpoint.timeouts

    @property
    def retry(self) -> RetryPolicy:
        return self._endpoint.retry

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self._name!r}, base_url={str(self._base_url)!r})"

    async def aclose(self) -> None:
        """Close every pooled connection. Safe to call more than once."""
        await self._pool.aclose()


class _Watchdog:
    """One timer per attempt that interrupts a wait when its deadline passes.

    Deadlines move forward on every network read; rather than creating and cancelling a timer
    per read (the cost of ``asyncio.timeout``), the handle is left where it is and, when it
    fires early, re-armed at the deadline then in force. It is only ever armed while the owning
    task awaits the network, so it can never interrupt the caller's own work between reads.
    """

    __slots__ = ("_cancelling", "_deadline", "_fired", "_handle", "_handle_at", "_task")

    def __init__(self) -> None:
        self._handle: asyncio.TimerHandle | None = None
        self._handle_at = _INF
        self._deadline = _INF
        self._task: asyncio.Task[Any] | None = None
        self._cancelling = 0
        self._fired = False

    def arm(self, deadline: float) -> None:
        """Watch the current task until :meth:`disarm`, interrupting it at ``deadline``."""
        task = _current_task()
        assert task is not None
        self._task = task
        self._cancelling = task.cancelling()
        self._deadline = deadline
        if deadline < self._handle_at:
            self._schedule(deadline)

    def tighten(self, deadline: float) -> None:
        """Bring the deadline of the current wait forward (never back)."""
        if self._task is not None and deadline < self._deadline:
            self._deadline = deadline
            if deadline < self._handle_at:
                self._schedule(deadline)

    def disarm(self) -> None:
        self._task = None

    def expired(self) -> bool:
        """After the watched wait raised: was it this watchdog that interrupted it?

        Withdraws the watchdog's cancellation request; false if someone else's cancellation is
        also pending (that one wins and must propagate).
        """
        if not self._fired:
            return False
        self._fired = False
        task = _current_task()
        assert task is not None
        return task.uncancel() <= self._cancelling

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
            self._handle_at = _INF
        self._task = None

    def _schedule(self, deadline: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        loop = asyncio.get_running_loop()
        self._handle = loop.call_later(max(0.0, deadline - _monotonic()), self._fire)
        self._handle_at = deadline

    def _fire(self) -> None:
        self._handle = None
        self._handle_at = _INF
        task = self._task
        if task is None:
            return  # nobody waiting: the next wait arms a fresh handle
        if self._deadline == _INF:
            return
        remaining = self._deadline - _monotonic()
        if remaining > 0:
            self._schedule(self._deadline)
            return
        self._fired = True
        task.cancel()


# -- errors ------------------------------------------------------------------------------------


def _status_error_class(status: int) -> type[ProviderError]:
    if status in (401, 403):
        return AuthenticationError
    if status == 404:
        return ModelNotFoundError
    if status == 429:
        return RateLimitError
    if status == 408 or status >= 500:
        return ServerError
    if 400 <= status < 500:
        return RequestRejectedError
    return ProtocolError


def status_error(
    status: int, body: bytes, headers: Mapping[str, str], reason: str | None
) -> ProviderError:
    """The error for a non-2xx response with (a bounded part of) its body."""
    try:
        obj: object = orjson.loads(body)
    except orjson.JSONDecodeError:
        obj = None
    fields = error_fields(obj)
    if fields is None:
        fields = (body.decode("utf-8", "replace").strip()[:MAX_ERROR_CHARS], None, None)
    message, code, error_type = fields
    if not message:
        message = reason or "error"
    # The error's code and type are the upstream's words too: bounded like its id.
    code = code[:MAX_UPSTREAM_ID_CHARS] if code else code
    error_type = error_type[:MAX_UPSTREAM_ID_CHARS] if error_type else error_type
    cls = _status_error_class(status)
    if cls is RequestRejectedError:
        overflow = context_length_error(f"HTTP {status}: {message}", code, error_type, obj)
        if overflow is not None:
            overflow.status = status
            return overflow
    retry_after = parse_retry_after(headers) if cls in (RateLimitError, ServerError) else None
    return cls(
        f"HTTP {status}: {message}",
        status=status,
        code=code,
        error_type=error_type,
        retry_after=retry_after,
    )


def _transport_error(exc: BaseException, *, started: bool) -> ProviderError:
    detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if isinstance(exc, aiohttp.ClientResponseError):
        return ProtocolError(f"invalid HTTP response: {detail}")
    if started or isinstance(exc, aiohttp.ClientPayloadError):
        return StreamInterruptedError(f"connection lost mid-stream: {detail}")
    return ConnectError(f"request failed before a response: {detail}")


# -- one attempt -------------------------------------------------------------------------------


class ResponseReader:
    """One attempt of a streamed request: send it, then read its events as the caller asks.

    :meth:`open` sends the request and returns once the response headers are in (a non-2xx
    status raises its error). Then :meth:`take` hands out the next delta already read, without
    any await (``None`` when none is buffered), and :meth:`fill` reads more from the network;
    at a proper end of the answer :meth:`fill` raises ``StopAsyncIteration``, at a premature
    one :class:`~moa_stream.TruncatedStreamError`. :meth:`finish` reads the rest of the body so
    the connection can be reused, and :meth:`close` gives the connection back (read to its end)
    or closes it (anything else, so that the server sees the client go).

    Per-attempt state lives here; what outlives an attempt (the timings, the total deadline)
    is passed in by the caller.
    """

    __slots__ = (
        "_body",
        "_connect_dl",
        "_content",
        "_decoder",
        "_ended",
        "_endpoint",
        "_events",
        "_first_token_dl",
        "_got_bytes",
        "_idle_dl",
        "_index",
        "_json_parts",
        "_note_time",
        "_on_data",
        "_on_event",
        "_parser",
        "_pool",
        "_read_time",
        "_resp",
        "_saw_done",
        "_timings",
        "_total_dl",
        "_watchdog",
        "delivered",
        "finish_reason",
        "output_chars",
        "request_id",
        "reused",
        "status",
        "usage",
    )

    def __init__(
        self,
        endpoint: Endpoint,
        pool: ConnectionPool,
        body: bytes,
        parser: EventParser,
        timings: StreamTimings,
        total_deadline: float,
    ) -> None:
        self._endpoint = endpoint
        self._pool = pool
        self._body = body
        self._parser = parser
        self._on_data = parser.data
        self._on_event = parser.event
        self._timings = timings
        self._note_time = timings.chunk_times.append
        self._total_dl = total_deadline
        self._connect_dl = _INF
        self._first_token_dl = _INF
        self._idle_dl = _INF
        self._watchdog = _Watchdog()
        self._resp: aiohttp.ClientResponse | None = None
        self._content: aiohttp.StreamReader | None = None
        self._decoder = SSEDecoder()
        self._json_parts: list[bytes] | None = None
        # Events of the last read, parsed one at a time as the caller asks: a delta is built
        # only when it is about to be handed out, and dies young if the caller drops it.
        self._events: Sequence[str | SSEEvent | Delta] = ()
        self._index = 0
        self._ended = False  # no more data will be read from this response
        self._saw_done = False
        self._got_bytes = False
        self._read_time = 0.0
        #: whether a delta of this attempt reached the caller (no retry after that)
        self.delivered = False
        #: whether the request went out on a pooled keep-alive connection
        self.reused = False
        self.status: int | None = None
        self.request_id: str | None = None
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        #: characters of content and reasoning handed out, for the usage estimate
        self.output_chars = 0

    # -- the attempt's life ------------------------------------------------------------------

    async def open(self) -> None:
        """Send the request and wait for the response headers."""
        session = self._pool.session()
        endpoint = self._endpoint
        assert endpoint.url is not None, "an HTTP endpoint has a URL"
        timings = self._timings
        timings.attempts += 1
        timeouts = endpoint.timeouts
        start = _monotonic()
        self._connect_dl = start + timeouts.connect if timeouts.connect is not None else _INF
        watchdog = self._watchdog
        watchdog.arm(min(self._connect_dl, self._total_dl))
        try:
            resp = await session.post(
                endpoint.url,
                data=self._body,
                headers=endpoint.headers,
                allow_redirects=False,
                trace_request_ctx=self,
            )
        except asyncio.CancelledError:
            if watchdog.expired():
                raise self._timeout_error() from None
            raise
        except (aiohttp.ClientError, OSError) as exc:
            if watchdog.expired():
                raise self._timeout_error() from exc
            raise _transport_error(exc, started=False) from exc
        finally:
            watchdog.disarm()

        now = _monotonic()
        timings.headers = now
        if timings.request_sent is None or timings.request_sent < start:
            timings.request_sent = start
        self._resp = resp
        self._content = resp.content
        self.status = resp.status
        request_id = resp.headers.get("x-request-id") or resp.headers.get("request-id")
        self.request_id = endpoint.clean(request_id) if request_id else None
        self._connect_dl = _INF
        if timeouts.idle is not None:
            self._idle_dl = now + timeouts.idle
        if self._first_token_dl == _INF and timeouts.first_token is not None:
            self._first_token_dl = timings.request_sent + timeouts.first_token
        if not 200 <= resp.status < 300:
            raise await self._status_error(resp)
        if resp.content_type == "application/json":
            self._json_parts = []

    def on_request_sent(self) -> None:
        """The request headers are on the wire: the first-token clock starts."""
        now = _monotonic()
        self._timings.request_sent = now
        first_token = self._endpoint.timeouts.first_token
        if first_token is not None and not self.delivered:
            self._first_token_dl = now + first_token
            self._watchdog.tighten(self._first_token_dl)

    def take(self) -> Delta | None:
        """The next delta among the events already read, or ``None`` when none is left."""
        events = self._events
        index = self._index
        while index < len(events):
            event = events[index]
            index += 1
            try:
                if type(event) is str:
                    result = self._on_data(event)
                elif type(event) is Delta:
                    result = event
                else:
                    result = self._on_event(event)  # type: ignore[arg-type]
            except ProviderError:
                self._index = index
                raise
            if result is None:
                continue
            self._index = index
            if type(result) is not Delta:  # the end of the answer
                self._ended = True
                self._saw_done = True
                self._events = ()
                return None
            self._note_time(self._read_time)
            self.delivered = True
            content = result.content
            if content:
                if self._timings.first_token is None:
                    self._timings.first_token = self._read_time
                self.output_chars += len(content)
            if result.reasoning:
                self.output_chars += len(result.reasoning)
            if result.finish_reason is not None:
                self.finish_reason = result.finish_reason
            if result.usage is not None:
                self.usage = result.usage
            return result
        self._index = index
        return None

    async def fill(self) -> None:
        """Read once from the network and decode what arrived."""
        self._events = ()
        self._index = 0
        if self._ended:
            if self._saw_done or self.finish_reason is not None:
                raise StopAsyncIteration
            if not self._got_bytes and self._json_parts is None:
                # llama-cpp-python's server streams nothing at all, with status 200, when the
                # prompt does not fit its context window; no other failure looks like this.
                raise ContextLengthError(
                    "the server answered 200 with an empty body, as llama-cpp-python's server "
                    "does when the prompt exceeds its context window"
                )
            raise TruncatedStreamError("the stream ended before a finish_reason")
        try:
            data = await self._read()
        except StreamInterruptedError:
            if self.finish_reason is None:
                raise
            data = b""  # the answer is complete; only the tail (usage, [DONE]) was lost
        if self._json_parts is not None:
            if data:
                self._json_parts.append(data)
            else:
                self._ended = True
                self._saw_done = True
                self._events = [self._parser.completion(b"".join(self._json_parts))]
            return
        if data:
            self._got_bytes = True
            self._events = self._decoder.feed_data(data)
        else:
            self._ended = True
            self._events = self._decoder.finish_data()

    async def finish(self) -> None:
        """The answer is complete: read the rest of the body (briefly), then release it."""
        content = self._content
        try:
            if content is not None and not content.at_eof():
                async with asyncio.timeout(_DRAIN_GRACE):
                    while await content.readany():
                        pass
        except (TimeoutError, aiohttp.ClientError, OSError, RuntimeError):
            pass  # not reusable: close() closes it
        finally:
            self.close()

    def close(self) -> None:
        """Give the connection back if its response was read to its end, else close it."""
        self._events = ()
        self._index = 0
        self._watchdog.close()
        resp, content = self._resp, self._content
        self._resp = None
        self._content = None
        if resp is not None:
            if content is not None and content.at_eof():
                self._pool.release(resp)
            else:
                resp.close()

    # -- reading -----------------------------------------------------------------------------

    async def _read(self) -> bytes:
        """The next piece of the body, ``b""`` at its end; bounded by the timeouts."""
        content = self._content
        assert content is not None
        watchdog = self._watchdog
        try:
            # What iter_any() does, minus its iterator layer: take everything already buffered,
            # else wait for the next piece. Never readline(): its line limit breaks big events.
            data = content.read_nowait()
            if not data and not content.at_eof():
                deadline = self._gap_deadline()
                if self._total_dl < deadline:
                    deadline = self._total_dl
                watchdog.arm(deadline)
                try:
                    data = await content.readany()
                finally:
                    watchdog.disarm()
        except asyncio.CancelledError:
            if watchdog.expired():
                raise self._timeout_error() from None
            raise
        except (aiohttp.ClientError, OSError, RuntimeError) as exc:
            # RuntimeError: aiohttp's reader reports a connection closed under it that way.
            if watchdog.expired():
                raise self._timeout_error() from exc
            raise _transport_error(exc, started=True) from exc
        now = _monotonic()
        self._read_time = now
        if now >= self._total_dl:
            raise self._timeout_error(total=True)
        idle = self._endpoint.timeouts.idle
        if idle is not None:
            self._idle_dl = now + idle
        return data

    def _gap_deadline(self) -> float:
        """When the current wait for data ends, total aside.

        Before the first token only ``first_token`` bounds it: a server may send its headers
        at once and think for minutes (the docs raise ``first_token`` to 120 s for Ollama
        while ``idle`` stays at 60 s), and ``idle`` is about gaps *between* chunks of an
        answer. Without a ``first_token`` limit, ``idle`` bounds the wait from the start.
        """
        if not self.delivered and self._first_token_dl != _INF:
            return self._first_token_dl
        return self._idle_dl

    async def _status_error(self, resp: aiohttp.ClientResponse) -> ProviderError:
        """The error for a non-2xx response; reads (a bounded part of) its body."""
        parts: list[bytes] = []
        size = 0
        try:
            while size < _ERROR_BODY_LIMIT:
                data = await self._read()
                if not data:
                    break
                parts.append(data)
                size += len(data)
        except ProviderError:
            pass  # the status says enough; the body was only for the message
        body = b"".join(parts)
        endpoint = self._endpoint
        if endpoint.secret:
            # Masked before the message is cut to length: a key straddling the cut would
            # otherwise leak its first part.
            body = endpoint.redact(body.decode("utf-8", "replace")).encode()
        # The reason phrase is the upstream's too (the message when the body says nothing).
        reason = endpoint.clean(resp.reason, MAX_ERROR_CHARS) if resp.reason else None
        return status_error(resp.status, body, resp.headers, reason)

    def _timeout_error(self, *, total: bool = False) -> ProviderTimeout:
        """The error for the deadline that expired: the earliest of those in force."""
        timeouts = self._endpoint.timeouts
        if total:
            return TotalTimeout(f"the stream took over {timeouts.total} s", timeout=timeouts.total)
        # The deadline the last wait ran under names the timeout, as _gap_deadline chose it.
        waiting_first = not self.delivered and self._first_token_dl != _INF
        candidates: list[tuple[float, ProviderTimeout]] = [
            (
                self._connect_dl,
                ConnectTimeout(
                    f"no response headers within {timeouts.connect} s", timeout=timeouts.connect
                ),
            ),
            (
                self._first_token_dl if not self.delivered else _INF,
                FirstTokenTimeout(
                    f"no token within {timeouts.first_token} s of sending the request",
                    timeout=timeouts.first_token,
                ),
            ),
            (
                _INF if waiting_first else self._idle_dl,
                IdleTimeout(f"no data for {timeouts.idle} s", timeout=timeouts.idle),
            ),
            (
                self._total_dl,
                TotalTimeout(f"the stream took over {timeouts.total} s", timeout=timeouts.total),
            ),
        ]
        return min(candidates, key=lambda c: c[0])[1]
