"""One HTTP attempt of a streamed completion over aiohttp, and the pool it runs on.

An attempt is two layers, both per request: :class:`HTTPExchange` sends the request, waits for
its headers and reads the body's bytes under the connect, first-token, idle and total deadlines,
then hands the connection back or closes it; :class:`ResponseReader` decodes those bytes (an
event stream, or a JSON body) into deltas with an :class:`EventParser`, the wire format's
business. Retries are the caller's (:mod:`moa_stream.providers._retry`); which error a status,
an exception or a deadline becomes is :mod:`moa_stream.providers._errors`'s. :class:`StreamSettings`
is the frozen description of where requests go and how, and :class:`ConnectionPool` the
provider's keep-alive session. :class:`AttemptState`, the base of :class:`HTTPExchange`, is what
every attempt holds, the LiteLLM provider's included.

This module is the single place where transport errors are translated: no aiohttp, OS,
``asyncio.TimeoutError`` or orjson exception leaves it, only
:class:`~moa_stream.ProviderError` subclasses (chained with ``raise ... from``),
:class:`~moa_stream.UsageError` and ``CancelledError``.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import math
import os
import random
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Generic, Protocol, TypeVar

import aiohttp
import orjson
import structlog
import yarl
from multidict import CIMultiDict, CIMultiDictProxy

from moa_stream._exceptions import (
    ConfigError,
    ContextLengthError,
    ProviderClosedError,
    ProviderError,
    ProviderTimeout,
    RequestRejectedError,
    StreamInterruptedError,
    TruncatedStreamError,
    UsageError,
)
from moa_stream._resource import AsyncResource
from moa_stream._secrets import MAX_UPSTREAM_ID_CHARS, clean, mask_secrets
from moa_stream._types import ChatRequest, Delta, StreamTimings, Usage
from moa_stream.providers._chunks import MAX_ERROR_CHARS, Done
from moa_stream.providers._errors import (
    connect_timeout,
    first_token_timeout,
    idle_timeout,
    status_error,
    total_timeout,
    transport_error,
)
from moa_stream.providers._policy import RetrySettings, Timeouts
from moa_stream.providers._watchdog import Deadlines, Watchdog
from moa_stream.providers.sse import SSEDecoder, SSEEvent

if TYPE_CHECKING:
    from moa_stream.providers._retry import HTTPStream

__all__ = [
    "AttemptState",
    "ConnectionPool",
    "EventParser",
    "HTTPExchange",
    "PooledHTTPProvider",
    "ResponseReader",
    "StreamSettings",
    "api_key_from",
    "api_root",
    "json_body",
]

_log = structlog.get_logger("moa_stream.providers")

#: The stream type of a :class:`PooledHTTPProvider` subclass.
StreamT = TypeVar("StreamT", bound="HTTPStream")

_INF: Final = math.inf
#: No events left to take: an iterator that is already exhausted.
_NO_EVENTS: Final[Iterator[Any]] = iter(())
_monotonic = time.monotonic

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
class StreamSettings:
    """Everything a stream needs to know about its provider, fixed when the provider is built.

    ``url`` receives the POST; ``headers`` go with it (the credentials among them, hence kept
    out of ``repr``); ``secret`` is masked in every error message. ``sleep`` and ``rng`` are the
    retry back-off's sleep and jitter source, injectable for tests.
    """

    name: str
    url: yarl.URL | None = None
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    timeouts: Timeouts = field(default_factory=Timeouts)
    retry: RetrySettings = field(default_factory=RetrySettings)
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
        secret = self.secret
        if not secret:
            return text[:limit]  # nothing to mask: clean() would only cut it
        return clean(text, (secret,), limit)


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

    __slots__ = ("_closed", "_idle_since", "_limit", "_loop", "_session", "deadlines")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        #: the one loop timer of every attempt's deadlines on this pool
        self.deadlines = Deadlines()
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
            # Our own timeouts bound every wait; aiohttp's would only race them.
            session = aiohttp.ClientSession(
                connector=_PoolConnector(self, self._limit),
                timeout=aiohttp.ClientTimeout(total=None, connect=None, sock_read=None),
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

    def _on_connection_reuse(self) -> None:
        if self._idle_since:
            # aiohttp hands out the most recently released connection first.
            self._idle_since.pop()


#: The exchange whose request the current task is sending: set around ``session.post``, read
#: by :class:`_PoolConnector` when it hands out the request's connection.
_sending: contextvars.ContextVar[HTTPExchange | None] = contextvars.ContextVar(
    "moa_stream_sending", default=None
)


class _PoolConnector(aiohttp.TCPConnector):
    """aiohttp's TCP connector, telling the pool and the request being sent when it hands out
    a connection: whether it is a pooled keep-alive one (a connection seen before), and that the
    request goes out on it now.

    The same two facts an aiohttp ``TraceConfig`` gives, without what tracing costs every
    request of the session: a trace object, five signals each with its parameter object, and
    the request's URL rebuilt.
    """

    def __init__(self, pool: ConnectionPool, limit: int) -> None:
        super().__init__(limit=limit)
        self._moa_pool = pool
        #: the connections (their protocols) handed out before: seeing one again is a reuse
        self._moa_seen: weakref.WeakSet[Any] = weakref.WeakSet()

    async def connect(  # aiohttp's signature, timeout included
        self,
        req: Any,
        traces: Any,
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109
    ) -> aiohttp.connector.Connection:
        conn = await super().connect(req, traces, timeout)
        protocol = conn.protocol
        reused = False
        if protocol is not None:
            seen = self._moa_seen
            if protocol in seen:
                reused = True
                self._moa_pool._on_connection_reuse()
            else:
                seen.add(protocol)
        exchange = _sending.get()
        if exchange is not None:
            if reused:
                exchange.reused = True
            exchange.on_request_sent()
        return conn


# -- what every HTTP provider shares -----------------------------------------------------------


def api_root(base_url: str) -> yarl.URL:
    """``base_url`` as a URL without a trailing slash; a :class:`~moa_stream.ConfigError`
    unless it is an http(s) URL with a host."""
    url = yarl.URL(base_url.rstrip("/"))
    if url.scheme not in ("http", "https") or not url.host:
        raise ConfigError(f"must be an http(s) URL, got {base_url!r}", path="base_url")
    return url


def api_key_from(api_key: str | None, api_key_env: str | None) -> str | None:
    """``api_key``, else the value of the environment variable named ``api_key_env``, read once
    here (a :class:`~moa_stream.ConfigError` if it is not set); ``None`` for no key."""
    if api_key is None and api_key_env is not None:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise ConfigError(f"environment variable {api_key_env} is not set", path="api_key")
    return api_key or None


def json_body(body: Mapping[str, Any]) -> bytes:
    """A request body as JSON; a :class:`~moa_stream.RequestRejectedError` when a value (an
    ``extra`` field, a message part) is of a type JSON has none for."""
    try:
        return orjson.dumps(body)
    except TypeError as exc:
        raise RequestRejectedError(f"the request cannot be encoded as JSON: {exc}") from exc


class PooledHTTPProvider(AsyncResource, Generic[StreamT]):
    """What every HTTP provider is besides its wire format: a name, an API root, frozen
    :class:`StreamSettings`, a :class:`ConnectionPool` that ``aclose()`` closes, the
    ``prewarm()`` that fills it and ``stream()``. Subclasses name their ``_stream_type``, call
    :meth:`_setup` in ``__init__`` and add ``_encode()``, the request body in their API's
    format (and ``_auth_headers()`` when the API does not take a bearer token)."""

    #: The stream :meth:`stream` returns; it reads the API's events.
    _stream_type: type[StreamT]
    _name: str
    _base_url: yarl.URL
    _models_url: yarl.URL
    _get_headers: Mapping[str, str]
    _settings: StreamSettings
    _pool: ConnectionPool

    def _setup(
        self,
        base_url: yarl.URL,
        *,
        name: str | None,
        stream_url: yarl.URL,
        models_url: yarl.URL,
        api_key: str | None,
        headers: Mapping[str, str] | None,
        timeouts: Timeouts | None,
        retry: RetrySettings | None,
        limit: int,
        sleep: Callable[[float], Awaitable[None]],
        rng: Callable[[], float],
    ) -> None:
        """Streams are POSTed to ``stream_url``, ``prewarm()`` GETs ``models_url``; both carry
        ``api_key`` (when there is one, as :meth:`_auth_headers` sends it, and masked in every
        message) and then ``headers``, which win. ``name`` defaults to the host of
        ``base_url``, with the port if one is given."""
        if limit < 1:
            raise ConfigError("must be at least 1", path="limit")
        host = base_url.host or ""
        port = base_url.explicit_port
        self._name = name or (f"{host}:{port}" if port else host)
        self._base_url = base_url
        self._models_url = models_url
        common = {**self._auth_headers(api_key), **(headers or {})} if api_key else headers or {}
        # Kept in aiohttp's own header type, so that a request does not convert them again.
        self._get_headers = CIMultiDictProxy(CIMultiDict({"Accept": "application/json", **common}))
        # Compression makes proxies and servers buffer an event stream: ask for none.
        stream_headers = CIMultiDictProxy(
            CIMultiDict(
                {
                    "Accept": "text/event-stream",
                    "Content-Type": "application/json",
                    "Accept-Encoding": "identity",
                    **common,
                }
            )
        )
        self._settings = StreamSettings(
            name=self._name,
            url=stream_url,
            headers=stream_headers,
            timeouts=timeouts or Timeouts(),
            retry=retry or RetrySettings(),
            secret=api_key,
            sleep=sleep,
            rng=rng,
        )
        self._pool = ConnectionPool(limit)

    def _auth_headers(self, api_key: str) -> dict[str, str]:
        """The headers that send ``api_key``: a bearer token, unless the API wants another."""
        return {"Authorization": f"Bearer {api_key}"}

    def _encode(self, request: ChatRequest) -> bytes:
        """``request`` as the body of a streamed request in this API's format."""
        raise NotImplementedError

    def stream(self, request: ChatRequest) -> StreamT:
        """A stream for ``request``; nothing is sent until it is entered or iterated."""
        return self._stream_type(self._settings, self._pool, request, lambda: self._encode(request))

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
        return self._settings.timeouts

    @property
    def retry(self) -> RetrySettings:
        return self._settings.retry

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self._name!r}, base_url={str(self._base_url)!r})"

    async def prewarm(self, connections: int = 1) -> None:
        """Open ``connections`` pooled keep-alive connections before they are needed.

        Each is opened by a ``GET`` of the API's model list read to its end, so the connection
        goes back to the pool; a later request then skips TCP (and TLS) set-up. Connections
        already idle in the pool count: a busy provider's pool is warm, and a prewarm request
        would only add load. Failures are logged at debug level and otherwise ignored: a
        prewarm is only ever an optimisation.
        """
        pool = self._pool
        try:
            session = pool.session()
        except UsageError as exc:
            _log.debug("provider.prewarm_failed", provider=self._name, error=str(exc))
            return
        connections -= pool.idle_connections()
        if connections <= 0:
            return
        url, headers, connect = self._models_url, self._get_headers, self.timeouts.connect

        async def one() -> None:
            try:
                async with asyncio.timeout(connect):
                    resp = await session.get(url, headers=headers, allow_redirects=False)
                    try:
                        await resp.read()
                    except BaseException:
                        resp.close()
                        raise
                    pool.release(resp)
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                _log.debug("provider.prewarm_failed", provider=self._name, error=type(exc).__name__)

        if connections == 1:
            await one()
            return
        async with asyncio.TaskGroup() as group:
            for _ in range(connections):
                group.create_task(one())

    async def aclose(self) -> None:
        """Close every pooled connection. Safe to call more than once."""
        await self._pool.aclose()


# -- one attempt -------------------------------------------------------------------------------


class AttemptState:
    """What every attempt holds, whatever carries it (HTTP here, LiteLLM's client elsewhere):
    the stream's settings, the timings and total deadline it shares with the attempts before
    it, and the attributes of :class:`~moa_stream.providers._retry.Attempt` that the retry
    loop reads, at their values before the request is sent."""

    __slots__ = (
        "_settings",
        "_timings",
        "_total_dl",
        "delivered",
        "finish_reason",
        "output_chars",
        "request_id",
        "reused",
        "status",
        "usage",
    )

    def __init__(
        self, settings: StreamSettings, timings: StreamTimings, total_deadline: float
    ) -> None:
        self._settings = settings
        self._timings = timings
        self._total_dl = total_deadline
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


class HTTPExchange(AttemptState):
    """The transport of one attempt: its request, and its response body as bytes, under the
    attempt's deadlines.

    :meth:`open` sends the request and returns once the response headers are in (a non-2xx
    status raises its error, with a bounded part of the body for the message). :meth:`_read`
    returns the next piece of the body. :meth:`finish` reads the rest of the body so the
    connection can be reused, and :meth:`close` gives the connection back (read to its end) or
    closes it (anything else, so that the server sees the client go).

    Every wait is bounded: ``connect`` until the headers, then ``first_token`` until a delta of
    this attempt reached the caller (:attr:`delivered`, which the decoding sets), ``idle``
    between reads, ``total`` throughout; a wait that outlives its deadline raises that deadline's
    :class:`~moa_stream.ProviderTimeout`. Per-attempt state lives here; what outlives an attempt
    (the timings, the total deadline) is passed in by the caller.
    """

    __slots__ = (
        "_body",
        "_connect_dl",
        "_content",
        "_first_token_dl",
        "_idle_dl",
        "_pool",
        "_read_time",
        "_resp",
        "_watchdog",
    )

    def __init__(
        self,
        settings: StreamSettings,
        pool: ConnectionPool,
        body: bytes,
        timings: StreamTimings,
        total_deadline: float,
    ) -> None:
        super().__init__(settings, timings, total_deadline)
        self._pool = pool
        self._body = body
        self._connect_dl = _INF
        self._first_token_dl = _INF
        self._idle_dl = _INF
        self._watchdog = Watchdog(pool.deadlines)
        self._resp: aiohttp.ClientResponse | None = None
        self._content: aiohttp.StreamReader | None = None
        #: when the last piece of the body arrived
        self._read_time = 0.0

    async def open(self) -> None:
        """Send the request and wait for the response headers."""
        session = self._pool.session()
        settings = self._settings
        assert settings.url is not None, "an HTTP provider has a URL"
        timings = self._timings
        timings.attempts += 1
        timeouts = settings.timeouts
        start = _monotonic()
        self._connect_dl = start + timeouts.connect if timeouts.connect is not None else _INF
        watchdog = self._watchdog
        watchdog.arm(min(self._connect_dl, self._total_dl))
        sending = _sending.set(self)
        try:
            resp = await session.post(
                settings.url, data=self._body, headers=settings.headers, allow_redirects=False
            )
        except asyncio.CancelledError:
            if watchdog.expired():
                raise self._timeout_error() from None
            raise
        except (aiohttp.ClientError, OSError) as exc:
            if watchdog.expired():
                raise self._timeout_error() from exc
            raise transport_error(exc, started=False) from exc
        finally:
            _sending.reset(sending)
            watchdog.disarm()

        now = _monotonic()
        timings.headers = now
        if timings.request_sent is None or timings.request_sent < start:
            timings.request_sent = start
        self._resp = resp
        self._content = resp.content
        self.status = resp.status
        request_id = resp.headers.get("x-request-id") or resp.headers.get("request-id")
        self.request_id = settings.clean(request_id) if request_id else None
        self._connect_dl = _INF
        if timeouts.idle is not None:
            self._idle_dl = now + timeouts.idle
        if self._first_token_dl == _INF and timeouts.first_token is not None:
            self._first_token_dl = timings.request_sent + timeouts.first_token
        if not 200 <= resp.status < 300:
            raise await self._status_error(resp)

    def on_request_sent(self) -> None:
        """The request has its connection and is being written: the first-token clock
        starts."""
        now = _monotonic()
        self._timings.request_sent = now
        first_token = self._settings.timeouts.first_token
        if first_token is not None and not self.delivered:
            self._first_token_dl = now + first_token
            self._watchdog.tighten(self._first_token_dl)

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
        self._watchdog.close()
        resp, content = self._resp, self._content
        self._resp = None
        self._content = None
        if resp is not None:
            if content is not None and content.at_eof():
                self._pool.release(resp)
            else:
                resp.close()

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
            raise transport_error(exc, started=True) from exc
        now = _monotonic()
        self._read_time = now
        if now >= self._total_dl:
            raise self._timeout_error(total=True)
        idle = self._settings.timeouts.idle
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
        settings = self._settings
        if settings.secret:
            # Masked before the message is cut to length: a key straddling the cut would
            # otherwise leak its first part.
            body = settings.redact(body.decode("utf-8", "replace")).encode()
        # The reason phrase is the upstream's too (the message when the body says nothing).
        reason = settings.clean(resp.reason, MAX_ERROR_CHARS) if resp.reason else None
        return status_error(resp.status, body, resp.headers, reason)

    def _timeout_error(self, *, total: bool = False) -> ProviderTimeout:
        """The error for the deadline that expired: the earliest of those in force."""
        timeouts = self._settings.timeouts
        if total:
            return total_timeout(timeouts)
        # The deadline the last wait ran under names the timeout, as _gap_deadline chose it.
        waiting_first = not self.delivered and self._first_token_dl != _INF
        candidates: list[tuple[float, Callable[[Timeouts], ProviderTimeout]]] = [
            (self._connect_dl, connect_timeout),
            (self._first_token_dl if not self.delivered else _INF, first_token_timeout),
            (_INF if waiting_first else self._idle_dl, idle_timeout),
            (self._total_dl, total_timeout),
        ]
        return min(candidates, key=lambda c: c[0])[1](timeouts)


class ResponseReader(HTTPExchange):
    """One attempt of a streamed request: an :class:`HTTPExchange` whose body is decoded into
    deltas as the caller asks.

    After :meth:`open`, :meth:`take` hands out the next delta already read, without any await
    (``None`` when none is buffered), and :meth:`fill` reads more from the network; at a proper
    end of the answer :meth:`fill` raises ``StopAsyncIteration``, at a premature one
    :class:`~moa_stream.TruncatedStreamError`. An event stream goes through an
    :class:`SSEDecoder`, each event through the :class:`EventParser`; a server that answered
    with a JSON body instead has it read whole and parsed as one completion.
    """

    __slots__ = (
        "_decoder",
        "_ended",
        "_events",
        "_got_bytes",
        "_json_parts",
        "_note_time",
        "_on_data",
        "_on_event",
        "_parser",
        "_saw_done",
    )

    def __init__(
        self,
        settings: StreamSettings,
        pool: ConnectionPool,
        body: bytes,
        parser: EventParser,
        timings: StreamTimings,
        total_deadline: float,
    ) -> None:
        super().__init__(settings, pool, body, timings, total_deadline)
        self._parser = parser
        self._on_data = parser.data
        self._on_event = parser.event
        self._note_time = timings.chunk_times.append
        self._decoder = SSEDecoder()
        self._json_parts: list[bytes] | None = None
        # Events of the last read, parsed one at a time as the caller asks: a delta is built
        # only when it is about to be handed out, and dies young if the caller drops it.
        self._events: Iterator[str | SSEEvent | Delta] = _NO_EVENTS
        self._ended = False  # no more data will be read from this response
        self._saw_done = False
        self._got_bytes = False

    async def open(self) -> None:
        """Send the request and wait for the response headers."""
        await super().open()
        resp = self._resp
        if resp is not None and resp.content_type == "application/json":
            self._json_parts = []

    def take(self) -> Delta | None:
        """The next delta among the events already read, or ``None`` when none is left."""
        for event in self._events:
            if type(event) is str:
                result = self._on_data(event)
            elif type(event) is Delta:
                result = event
            else:
                result = self._on_event(event)  # type: ignore[arg-type]
            if result is None:
                continue
            if type(result) is not Delta:  # the end of the answer
                self._ended = True
                self._saw_done = True
                self._events = _NO_EVENTS
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
        return None

    async def fill(self) -> None:
        """Read once from the network and decode what arrived."""
        self._events = _NO_EVENTS
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
                self._events = iter([self._parser.completion(b"".join(self._json_parts))])
            return
        if data:
            self._got_bytes = True
            self._events = iter(self._decoder.feed_data(data))
        else:
            self._ended = True
            self._events = iter(self._decoder.finish_data())

    def close(self) -> None:
        """Drop the events not handed out, and give the connection back or close it."""
        self._events = _NO_EVENTS
        super().close()
