"""A provider for any OpenAI-compatible ``/chat/completions`` endpoint, over aiohttp.

Layers, from the socket up: aiohttp's stream reader hands raw body pieces to the I/O-free
:class:`~moa_stream.providers.sse.SSEDecoder`; each event's data goes through the pure
``parse_chunk``; :class:`OpenAIStream` adds timeouts, retries and timings around them.

This module is the single place where transport errors are translated: no aiohttp, OS,
``asyncio.TimeoutError`` or orjson exception leaves it, only
:class:`~moa_stream.ProviderError` subclasses (chained with ``raise ... from``) and
``CancelledError``.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Final, Literal, Self

import aiohttp
import orjson
import structlog
import yarl

from moa_stream._exceptions import (
    AuthenticationError,
    ConfigError,
    ConnectError,
    ConnectTimeout,
    FirstTokenTimeout,
    IdleTimeout,
    ModelNotFoundError,
    ProtocolError,
    ProviderError,
    ProviderTimeout,
    RateLimitError,
    RequestRejectedError,
    ServerError,
    StreamInterruptedError,
    TotalTimeout,
    TransientError,
    TruncatedStreamError,
)
from moa_stream._resource import AsyncResource
from moa_stream._secrets import mask_secrets
from moa_stream._types import ChatRequest, Delta, StreamTimings, Usage
from moa_stream._wire import chat_request_body, parse_retry_after
from moa_stream.providers._chunks import (
    DONE,
    Done,
    parse_chunk,
    parse_completion,
    parse_error_body,
    upstream_error,
)
from moa_stream.providers.sse import SSEDecoder, SSEEvent

__all__ = ["OpenAIProvider", "OpenAIStream", "RetryPolicy", "Timeouts"]

_log = structlog.get_logger(__name__)

_INF: Final = math.inf
_monotonic = time.monotonic
_current_task = asyncio.current_task

#: Upper bound on an error response body kept for its message.
_ERROR_BODY_LIMIT: Final = 64 * 1024
#: How long a finished stream waits for the end of the HTTP body after ``[DONE]``. Reading the
#: body to its end lets the connection go back to the pool; servers end it right after
#: ``[DONE]``, and a server that doesn't costs at most this much.
_DRAIN_GRACE: Final = 0.1

# Stream states.
_NEW: Final = 0
_OPEN: Final = 1
_ENDED: Final = 2  # finished normally
_FAILED: Final = 3
_CLOSED: Final = 4  # closed by the caller before the end


def _check_limit(value: float | None, name: str) -> None:
    if value is not None and not value > 0:
        raise ConfigError(f"must be a positive number of seconds or None, got {value!r}", path=name)


@dataclass(frozen=True, slots=True)
class Timeouts:
    """The four limits of one streamed request, in seconds; ``None`` means no limit.

    ``connect``: from sending an attempt until the response headers arrive.
    ``first_token``: from the moment the request was written until the first delta passed to
    the caller (content, reasoning, or a finish); role-only chunks and keep-alive comments do
    not count. Each attempt gets its own. ``idle``: the longest gap between two network reads
    once the headers are in (keep-alives do count: the connection is alive). ``total``: the
    whole stream, retries and back-off included.
    """

    connect: float | None = 10.0
    first_token: float | None = 60.0
    idle: float | None = 60.0
    total: float | None = 600.0

    def __post_init__(self) -> None:
        _check_limit(self.connect, "timeouts.connect")
        _check_limit(self.first_token, "timeouts.first_token")
        _check_limit(self.idle, "timeouts.idle")
        _check_limit(self.total, "timeouts.total")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When and how a stream retries before its first delta reached the caller.

    Retried: connection failures, 408, 429 and 5xx, timeouts other than ``total``, and streams
    that broke or ended before any delta. Never retried once a delta was delivered.

    ``max_attempts`` counts requests, the first included (1 disables retries). The delay
    before retry *n* is ``min(backoff_cap, backoff_base * 2**(n-1))``, shortened by up to
    ``jitter`` (a fraction) at random so that many clients don't retry in step. A server's
    ``Retry-After`` / ``retry-after-ms`` replaces that delay; one asking for more than
    ``max_retry_after`` seconds is not retried at all, so that the caller can fail over to
    another provider at once instead of waiting.
    """

    max_attempts: int = 3
    backoff_base: float = 0.2
    backoff_cap: float = 2.0
    jitter: float = 0.25
    max_retry_after: float = 10.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigError("must be at least 1", path="retry.max_attempts")
        if self.backoff_base < 0 or self.backoff_cap < 0 or self.max_retry_after < 0:
            raise ConfigError("delays must not be negative", path="retry")
        if not 0 <= self.jitter <= 1:
            raise ConfigError("must be between 0 and 1", path="retry.jitter")

    def delay(self, retry: int, rand: float) -> float:
        """Back-off before retry number ``retry`` (1-based); ``rand`` is uniform in [0, 1)."""
        base = min(self.backoff_cap, self.backoff_base * 2.0 ** (retry - 1))
        return base * (1.0 - self.jitter * rand)


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


def _other(event: SSEEvent | Delta) -> Delta | Done | None:
    """What an event other than a plain data string stands for."""
    if isinstance(event, Delta):
        return event
    if event.event == "error":
        raise upstream_error(event.data)
    return parse_chunk(event.data)


class _Watchdog:
    """One timer per stream that interrupts a wait when its deadline passes.

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


class OpenAIStream(AsyncResource):
    """One streamed chat completion from an :class:`OpenAIProvider`.

    Use it as ``async with provider.stream(request) as stream: async for delta in stream``.
    The request is sent on ``__aenter__`` (which returns once response headers arrived), or on
    the first ``__anext__`` without ``async with``. Each :class:`~moa_stream.Delta` carries
    content, reasoning, a finish reason or usage; chunks carrying none of them are skipped.

    Until the first delta has been returned, failures that may be transient are retried
    transparently according to the provider's :class:`RetryPolicy`; after it, an error
    propagates with ``delivered=True``. Iteration raises only
    :class:`~moa_stream.ProviderError` subclasses, and ``CancelledError``.

    Leaving the ``async with`` block early, ``aclose()`` or a cancelled read closes the
    connection, so the server sees the client go. A stream that ran to its end returns its
    connection to the pool.
    """

    __slots__ = (
        "_body",
        "_connect_dl",
        "_content",
        "_content_count",
        "_decoder",
        "_delivered",
        "_ended",
        "_events",
        "_finish",
        "_first_token_dl",
        "_idle_dl",
        "_index",
        "_json_parts",
        "_note_time",
        "_provider",
        "_read_time",
        "_request",
        "_request_id",
        "_resp",
        "_reused",
        "_saw_done",
        "_state",
        "_status",
        "_timings",
        "_total_dl",
        "_usage",
        "_watchdog",
    )

    def __init__(self, provider: OpenAIProvider, request: ChatRequest) -> None:
        self._provider = provider
        self._request = request
        self._state = _NEW
        self._body: bytes | None = None
        self._timings = StreamTimings()
        self._note_time = self._timings.chunk_times.append
        self._watchdog = _Watchdog()
        self._resp: aiohttp.ClientResponse | None = None
        self._content: aiohttp.StreamReader | None = None
        self._decoder = SSEDecoder()
        self._json_parts: list[bytes] | None = None
        # Events of the last read, parsed one at a time as the caller asks: a delta is built
        # only when it is about to be handed out, and dies young if the caller drops it.
        self._events: Sequence[str | SSEEvent | Delta] = ()
        self._index = 0
        self._ended = False  # no more data will be read from the current response
        self._saw_done = False
        self._delivered = False
        self._finish: str | None = None
        self._usage: Usage | None = None
        self._content_count = 0
        self._read_time = 0.0
        self._request_id: str | None = None
        self._status: int | None = None
        self._reused = False
        self._connect_dl = _INF
        self._first_token_dl = _INF
        self._idle_dl = _INF
        self._total_dl = _INF

    def __repr__(self) -> str:
        state = ("new", "open", "ended", "failed", "closed")[self._state]
        return (
            f"<OpenAIStream provider={self._provider.name!r} model={self._request.model!r} "
            f"state={state}>"
        )

    # -- the ProviderStream protocol -------------------------------------------------------

    @property
    def finish_reason(self) -> str | None:
        """The finish reason the server sent, once it has."""
        return self._finish

    @property
    def usage(self) -> Usage | None:
        """The server's token counts, or an estimate (``estimated=True``) if it sent none.

        The estimate counts prompt characters / 4 and one token per content or reasoning
        delta. ``None`` before the stream started.
        """
        if self._usage is not None:
            return self._usage
        if self._state == _NEW:
            return None
        chars = 0
        for message in self._request.messages:
            content = message.get("content")
            if isinstance(content, str):
                chars += len(content)
        return Usage(chars // 4, self._content_count, estimated=True)

    @property
    def timings(self) -> StreamTimings:
        """Timestamps of this stream on ``time.monotonic()``; see :class:`StreamTimings`."""
        return self._timings

    @property
    def request_id(self) -> str | None:
        """The upstream's ``x-request-id`` of the last attempt, if it sent one."""
        return self._request_id

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Delta:
        events = self._events
        index = self._index
        while True:
            # Events already read are handed out without any await.
            while index < len(events):
                event = events[index]
                index += 1
                try:
                    result = parse_chunk(event) if isinstance(event, str) else _other(event)
                except ProviderError as exc:
                    self._index = index
                    self._fail(exc)
                    raise
                if result is None:
                    continue
                self._index = index
                if result is DONE:
                    self._ended = True
                    self._saw_done = True
                    break
                read_time = self._read_time
                self._note_time(read_time)
                self._delivered = True
                if result.content:
                    self._content_count += 1
                    if self._timings.first_token is None:
                        self._timings.first_token = read_time
                elif result.reasoning:
                    self._content_count += 1
                if result.finish_reason is not None:
                    self._finish = result.finish_reason
                if result.usage is not None:
                    self._usage = result.usage
                return result
            await self._advance()
            events = self._events
            index = 0

    async def __aenter__(self) -> Self:
        if self._state == _NEW:
            self._begin()
            try:
                while self._resp is None:
                    try:
                        await self._open()
                    except ProviderError as exc:
                        await self._retry_or_raise(exc)
            except ProviderError as exc:
                self._fail(exc)
                raise
            except BaseException:
                self._close(_CLOSED)
                raise
        return self

    async def aclose(self) -> None:
        """Close the stream and its connection. Safe to call more than once."""
        if self._state == _OPEN:
            self._close(_CLOSED)
        elif self._state == _NEW:
            self._state = _CLOSED

    # -- internals ---------------------------------------------------------------------------

    def _begin(self) -> None:
        self._state = _OPEN
        now = _monotonic()
        self._timings.started = now
        total = self._provider.timeouts.total
        self._total_dl = now + total if total is not None else _INF

    async def _advance(self) -> None:
        """Read the next piece of the stream into ``_events``, or end the iteration."""
        self._events = ()
        self._index = 0
        state = self._state
        if state != _OPEN:
            if state != _NEW:
                raise StopAsyncIteration
            self._begin()
        try:
            while True:
                try:
                    if self._resp is None:
                        await self._open()
                    else:
                        await self._read_more()
                        return
                except ProviderError as exc:
                    await self._retry_or_raise(exc)
        except StopAsyncIteration:
            await self._finish_ok()
            raise
        except ProviderError as exc:
            self._fail(exc)
            raise
        except BaseException:
            self._close(_CLOSED)
            raise

    async def _open(self) -> None:
        """Send one attempt and wait for its response headers."""
        provider = self._provider
        session = provider._session_for_stream()
        if self._body is None:
            self._body = provider._encode(self._request)
        timings = self._timings
        timings.attempts += 1
        timeouts = provider.timeouts
        start = _monotonic()
        self._connect_dl = start + timeouts.connect if timeouts.connect is not None else _INF
        self._first_token_dl = _INF
        self._idle_dl = _INF
        self._reused = False
        self._ended = False
        self._saw_done = False
        self._request_id = None
        self._status = None
        self._decoder = SSEDecoder()
        self._json_parts = None
        watchdog = self._watchdog
        watchdog.arm(min(self._connect_dl, self._total_dl))
        try:
            resp = await session.post(
                provider._chat_url,
                data=self._body,
                headers=provider._stream_headers,
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
            raise self._transport_error(exc, started=False) from exc
        finally:
            watchdog.disarm()

        now = _monotonic()
        timings.headers = now
        if timings.request_sent is None or timings.request_sent < start:
            timings.request_sent = start
        self._resp = resp
        self._content = resp.content
        self._status = resp.status
        self._request_id = resp.headers.get("x-request-id") or resp.headers.get("request-id")
        self._connect_dl = _INF
        if timeouts.idle is not None:
            self._idle_dl = now + timeouts.idle
        if self._first_token_dl == _INF and timeouts.first_token is not None:
            self._first_token_dl = timings.request_sent + timeouts.first_token
        if not 200 <= resp.status < 300:
            raise await self._status_error(resp)
        if resp.content_type == "application/json":
            self._json_parts = []

    def _on_request_sent(self) -> None:
        """The request headers are on the wire: the first-token clock starts."""
        now = _monotonic()
        self._timings.request_sent = now
        first_token = self._provider.timeouts.first_token
        if first_token is not None and not self._delivered:
            self._first_token_dl = now + first_token
            self._watchdog.tighten(self._first_token_dl)

    async def _read_more(self) -> None:
        """Read once from the network and decode what arrived."""
        if self._ended:
            if self._saw_done or self._finish is not None:
                raise StopAsyncIteration
            raise TruncatedStreamError("the stream ended before a finish_reason")
        try:
            data = await self._read()
        except StreamInterruptedError:
            if self._finish is None:
                raise
            data = b""  # the answer is complete; only the tail (usage, [DONE]) was lost
        if self._json_parts is not None:
            if data:
                self._json_parts.append(data)
            else:
                self._ended = True
                self._saw_done = True
                self._events = [parse_completion(b"".join(self._json_parts))]
            return
        if data:
            self._events = self._decoder.feed_data(data)
        else:
            self._ended = True
            self._events = self._decoder.finish_data()

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
                deadline = self._idle_dl
                if not self._delivered and self._first_token_dl < deadline:
                    deadline = self._first_token_dl
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
            raise self._transport_error(exc, started=True) from exc
        now = _monotonic()
        self._read_time = now
        if now >= self._total_dl:
            raise self._timeout_error(total=True)
        idle = self._provider.timeouts.idle
        if idle is not None:
            self._idle_dl = now + idle
        return data

    async def _status_error(self, resp: aiohttp.ClientResponse) -> ProviderError:
        """The error for a non-2xx response; reads (a bounded part of) its body."""
        status = resp.status
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
        key = self._provider._api_key
        if key:
            # Before parse_error_body cuts the text: a key straddling the cut would half leak.
            body = mask_secrets(body.decode("utf-8", "replace"), (key,)).encode()
        message, code, error_type = parse_error_body(body)
        if not message:
            message = resp.reason or "error"
        cls = _status_error_class(status)
        retry_after = parse_retry_after(resp.headers)
        return cls(
            f"HTTP {status}: {message}",
            status=status,
            code=code,
            error_type=error_type,
            retry_after=retry_after if cls in (RateLimitError, ServerError) else None,
        )

    def _timeout_error(self, *, total: bool = False) -> ProviderTimeout:
        """The error for the deadline that expired: the earliest of those in force."""
        timeouts = self._provider.timeouts
        if total:
            return TotalTimeout(f"the stream took over {timeouts.total} s", timeout=timeouts.total)
        candidates: list[tuple[float, ProviderTimeout]] = [
            (
                self._connect_dl,
                ConnectTimeout(
                    f"no response headers within {timeouts.connect} s", timeout=timeouts.connect
                ),
            ),
            (
                self._first_token_dl if not self._delivered else _INF,
                FirstTokenTimeout(
                    f"no token within {timeouts.first_token} s of sending the request",
                    timeout=timeouts.first_token,
                ),
            ),
            (
                self._idle_dl,
                IdleTimeout(f"no data for {timeouts.idle} s", timeout=timeouts.idle),
            ),
            (
                self._total_dl,
                TotalTimeout(f"the stream took over {timeouts.total} s", timeout=timeouts.total),
            ),
        ]
        return min(candidates, key=lambda c: c[0])[1]

    def _transport_error(self, exc: BaseException, *, started: bool) -> ProviderError:
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if isinstance(exc, aiohttp.ClientResponseError):
            return ProtocolError(f"invalid HTTP response: {detail}")
        if started or isinstance(exc, aiohttp.ClientPayloadError):
            return StreamInterruptedError(f"connection lost mid-stream: {detail}")
        return ConnectError(f"request failed before a response: {detail}")

    async def _retry_or_raise(self, exc: ProviderError) -> None:
        """Drop the current attempt; raise ``exc`` unless it should be retried, else back off."""
        self._drop_response(exc)
        if self._delivered:
            raise exc
        policy = self._provider.retry
        attempts = self._timings.attempts
        if (
            not isinstance(exc, TransientError)
            or isinstance(exc, TotalTimeout)
            or attempts >= policy.max_attempts
        ):
            raise exc
        if exc.retry_after is not None:
            if exc.retry_after > policy.max_retry_after:
                raise exc
            delay = exc.retry_after
        elif self._reused and isinstance(exc, ConnectError):
            # A pooled connection the server had already closed: nothing is wrong upstream.
            delay = 0.0
        else:
            delay = policy.delay(attempts, self._provider._rng())
        if _monotonic() + delay >= self._total_dl:
            raise exc
        _log.info(
            "provider.retry",
            provider=self._provider.name,
            model=self._request.model,
            attempt=attempts,
            delay=round(delay, 3),
            error=exc.kind,
            status=exc.status,
        )
        await self._provider._sleep(delay)

    def _drop_response(self, exc: ProviderError | None = None) -> None:
        if exc is not None:
            self._contextualize(exc)
        resp, content = self._resp, self._content
        if resp is not None:
            self._resp = None
            self._content = None
            # An error body read to its end leaves a connection the retry can reuse.
            if content is not None and content.at_eof():
                resp.release()
            else:
                resp.close()
        self._events = ()
        self._index = 0

    def _contextualize(self, exc: ProviderError) -> None:
        if exc.provider is None:
            exc.provider = self._provider.name
        if exc.model is None:
            exc.model = self._request.model
        if exc.status is None:
            exc.status = self._status
        if exc.request_id is None:
            exc.request_id = self._request_id
        exc.delivered = self._delivered
        key = self._provider._api_key
        if key:
            masked = mask_secrets(exc.message, (key,))
            if masked != exc.message:
                exc.message = masked
                exc.args = (masked,)

    def _fail(self, exc: ProviderError) -> None:
        self._contextualize(exc)
        self._close(_FAILED)
        _log.warning(
            "provider.failed",
            provider=exc.provider,
            model=exc.model,
            error=exc.kind,
            status=exc.status,
            request_id=exc.request_id,
            delivered=exc.delivered,
            attempts=self._timings.attempts,
            message=exc.message,
        )

    async def _finish_ok(self) -> None:
        """The stream ended normally: hand the connection back to the pool if possible."""
        content = self._content
        try:
            if content is not None and not content.at_eof():
                async with asyncio.timeout(_DRAIN_GRACE):
                    while await content.readany():
                        pass
        except (TimeoutError, aiohttp.ClientError, OSError, RuntimeError):
            pass  # not reusable: _close closes it
        finally:
            self._close(_ENDED)

    def _close(self, state: int) -> None:
        self._state = state
        self._events = ()
        self._index = 0
        self._watchdog.close()
        resp, content = self._resp, self._content
        self._resp = None
        self._content = None
        if resp is not None:
            if state == _ENDED and content is not None and content.at_eof():
                resp.release()
            else:
                resp.close()
        if self._timings.end is None:
            self._timings.end = _monotonic()


async def _on_request_headers_sent(
    session: aiohttp.ClientSession,
    ctx: SimpleNamespace,
    params: aiohttp.TraceRequestHeadersSentParams,
) -> None:
    stream = ctx.trace_request_ctx
    if isinstance(stream, OpenAIStream):
        stream._on_request_sent()


async def _on_connection_reuse(
    session: aiohttp.ClientSession,
    ctx: SimpleNamespace,
    params: aiohttp.TraceConnectionReuseconnParams,
) -> None:
    stream = ctx.trace_request_ctx
    if isinstance(stream, OpenAIStream):
        stream._reused = True


class OpenAIProvider(AsyncResource):
    """An OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, SGLang, llama.cpp, Ollama,
    Together, Groq, OpenRouter ...).

    ``base_url`` is the API root, e.g. ``"http://127.0.0.1:8000/v1"``; requests go to
    ``{base_url}/chat/completions``. ``name`` identifies the provider in errors and logs
    (default: the host, with the port if one is given). The API key is ``api_key``, or read
    once here from the environment variable named by ``api_key_env``; it is sent as a bearer
    token and never appears in messages, logs or ``repr``. ``headers`` are added to every
    request. ``max_tokens_field`` picks the name ``ChatRequest.max_tokens`` is sent under;
    ``stream_options_usage`` asks for the final usage chunk (turn it off for servers that
    reject ``stream_options``). ``limit`` caps the pooled connections.

    ``sleep`` and ``rng`` (a callable returning a float in [0, 1)) are the back-off's sleep
    and jitter source; tests pass their own to make retries instant and deterministic.

    One keep-alive connection pool per provider, created on first use inside the running event
    loop; use the provider from that loop only. Close it with ``aclose()`` or
    ``async with``.
    """

    def __init__(
        self,
        base_url: str,
        *,
        name: str | None = None,
        api_key: str | None = None,
        api_key_env: str | None = None,
        headers: Mapping[str, str] | None = None,
        max_tokens_field: Literal["max_tokens", "max_completion_tokens"] = "max_tokens",
        timeouts: Timeouts | None = None,
        retry: RetryPolicy | None = None,
        stream_options_usage: bool = True,
        limit: int = 100,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: Callable[[], float] = random.random,
    ) -> None:
        url = yarl.URL(base_url.rstrip("/"))
        if url.scheme not in ("http", "https") or not url.host:
            raise ConfigError(f"must be an http(s) URL, got {base_url!r}", path="base_url")
        if max_tokens_field not in ("max_tokens", "max_completion_tokens"):
            raise ConfigError(
                f"must be 'max_tokens' or 'max_completion_tokens', got {max_tokens_field!r}",
                path="max_tokens_field",
            )
        if limit < 1:
            raise ConfigError("must be at least 1", path="limit")
        if api_key is None and api_key_env is not None:
            api_key = os.environ.get(api_key_env)
            if not api_key:
                raise ConfigError(f"environment variable {api_key_env} is not set", path="api_key")
        self._base_url = url
        self._chat_url = url / "chat" / "completions"
        self._models_url = url / "models"
        self._name = name or (f"{url.host}:{url.explicit_port}" if url.explicit_port else url.host)
        self._api_key = api_key or None
        self.timeouts = timeouts or Timeouts()
        self.retry = retry or RetryPolicy()
        self.max_tokens_field = max_tokens_field
        self.stream_options_usage = stream_options_usage
        self._limit = limit
        self._sleep = sleep
        self._rng = rng
        common: dict[str, str] = {}
        if self._api_key:
            common["Authorization"] = f"Bearer {self._api_key}"
        common.update(headers or {})
        # Compression makes proxies and servers buffer an event stream: ask for none.
        self._stream_headers = {
            "Accept": "text/event-stream",
            "Content-Type": "application/json",
            "Accept-Encoding": "identity",
            **common,
        }
        self._get_headers = {"Accept": "application/json", **common}
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    @property
    def name(self) -> str:
        """The provider's name in errors, logs and metrics."""
        return self._name

    @property
    def base_url(self) -> str:
        """The API root requests are sent under."""
        return str(self._base_url)

    def __repr__(self) -> str:
        return f"OpenAIProvider(name={self._name!r}, base_url={str(self._base_url)!r})"

    def stream(self, request: ChatRequest) -> OpenAIStream:
        """A stream for ``request``; nothing is sent until it is entered or iterated."""
        return OpenAIStream(self, request)

    async def prewarm(self, connections: int = 1) -> None:
        """Open ``connections`` pooled keep-alive connections before they are needed.

        Each is opened by a ``GET {base_url}/models`` read to its end, so the connection goes
        back to the pool; a later request then skips TCP (and TLS) set-up. Connections already
        idle in the pool count: a busy provider's pool is warm, and a prewarm request would
        only add load. Failures are logged at debug level and otherwise ignored: a prewarm is
        only ever an optimisation.
        """
        try:
            session = self._session_for_stream()
        except ProviderError as exc:
            _log.debug("provider.prewarm_failed", provider=self._name, error=exc.message)
            return
        connections -= self._idle_connections()
        if connections <= 0:
            return
        if connections <= 1:
            await self._prewarm_one(session)
            return
        async with asyncio.TaskGroup() as group:
            for _ in range(connections):
                group.create_task(self._prewarm_one(session))

    def _idle_connections(self) -> int:
        """Idle keep-alive connections in the pool, or 0 when that can't be told.

        aiohttp has no public count, so this reads the connector's pool and falls back to 0
        (always prewarm) if its shape ever changes: it can make a prewarm cheaper, never wrong.
        """
        session = self._session
        pool = getattr(session.connector, "_conns", None) if session is not None else None
        try:
            return sum(len(idle) for idle in pool.values()) if pool else 0
        except (AttributeError, TypeError):
            return 0

    async def _prewarm_one(self, session: aiohttp.ClientSession) -> None:
        try:
            async with asyncio.timeout(self.timeouts.connect):
                async with session.get(
                    self._models_url, headers=self._get_headers, allow_redirects=False
                ) as resp:
                    await resp.read()
        except (aiohttp.ClientError, OSError) as exc:
            _log.debug("provider.prewarm_failed", provider=self._name, error=type(exc).__name__)

    async def aclose(self) -> None:
        """Close every pooled connection. Safe to call more than once."""
        self._closed = True
        session, self._session = self._session, None
        if session is not None and not session.closed:
            await session.close()

    def _session_for_stream(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RequestRejectedError("the provider is closed", code="provider_closed")
        loop = asyncio.get_running_loop()
        session = self._session
        if session is None:
            trace = aiohttp.TraceConfig()
            trace.on_request_headers_sent.append(_on_request_headers_sent)
            trace.on_connection_reuseconn.append(_on_connection_reuse)
            # Our own timeouts bound every wait; aiohttp's would only race them.
            session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._limit),
                timeout=aiohttp.ClientTimeout(total=None, connect=None, sock_read=None),
                trace_configs=[trace],
            )
            self._session = session
            self._loop = loop
        elif self._loop is not loop:
            raise RequestRejectedError(
                "the provider was first used in another event loop; create one per loop",
                code="wrong_event_loop",
            )
        return session

    def _encode(self, request: ChatRequest) -> bytes:
        body = chat_request_body(
            request,
            stream=True,
            max_tokens_field=self.max_tokens_field,
            include_usage=self.stream_options_usage,
        )
        try:
            return orjson.dumps(body)
        except TypeError as exc:
            raise RequestRejectedError(f"the request cannot be encoded as JSON: {exc}") from exc
