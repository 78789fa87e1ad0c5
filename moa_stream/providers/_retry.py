"""The retry wrapper: one streamed completion over as many attempts as its settings allow.

Retries live here, outside the code that reads a response (``_http.ResponseReader``), as the
official OpenAI client keeps them in its base client and out of its stream: an attempt knows
nothing of the ones before it, and the stream knows nothing of bytes or sockets.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, Protocol, Self, TypeVar

import structlog

from moa_stream._exceptions import (
    ConnectError,
    ContextLengthError,
    ProviderError,
    TotalTimeout,
    TransientError,
)
from moa_stream._resource import AsyncResource
from moa_stream._types import ChatMessage, ChatRequest, Delta, StreamTimings, Usage, estimate_tokens
from moa_stream.providers._chunks import MAX_ERROR_CHARS
from moa_stream.providers._estimate import estimate_prompt_tokens
from moa_stream.providers._http import ConnectionPool, EventParser, ResponseReader, StreamSettings

__all__ = ["Attempt", "HTTPStream", "RetryingStream"]

_log = structlog.get_logger("moa_stream.providers")

_INF: Final = math.inf
_monotonic = time.monotonic

_T = TypeVar("_T")

# Stream states.
_NEW: Final = 0
_OPEN: Final = 1
_ENDED: Final = 2  # finished normally
_FAILED: Final = 3
_CLOSED: Final = 4  # closed by the caller before the end
_STATE_NAMES: Final = ("new", "open", "ended", "failed", "closed")


class Attempt(Protocol):
    """One try at a streamed completion, as :class:`RetryingStream` drives it.

    ``open()`` sends the request (raising its error); ``take()`` hands out the next delta
    already received without awaiting (``None`` when there is none); ``fill()`` waits for more,
    raising ``StopAsyncIteration`` at a proper end; ``finish()`` ends a complete answer
    cleanly, ``close()`` abandons the attempt. The attributes describe what happened so far.
    :class:`~moa_stream.providers._http.ResponseReader` is the HTTP one.
    """

    delivered: bool
    reused: bool
    status: int | None
    request_id: str | None
    finish_reason: str | None
    usage: Usage | None
    #: characters of content and reasoning handed out, for the usage estimate
    output_chars: int

    async def open(self) -> None: ...

    def take(self) -> Delta | None: ...

    async def fill(self) -> None: ...

    async def finish(self) -> None: ...

    def close(self) -> None: ...


class RetryingStream(AsyncResource):
    """One streamed chat completion, retried before its first delta as its settings'
    :class:`~moa_stream.providers.RetrySettings` allows.

    Use it as ``async with provider.stream(request) as stream: async for delta in stream``.
    The request is sent on ``__aenter__`` (which returns once response headers arrived), or on
    the first ``__anext__`` without ``async with``. Each :class:`~moa_stream.Delta` carries
    content, reasoning, a finish reason or usage; events carrying none of them are skipped.

    Until the first delta has been returned, failures that may be transient are retried
    transparently; after it, an error propagates with ``delivered=True``. Iteration raises
    only :class:`~moa_stream.ProviderError` subclasses, :class:`~moa_stream.UsageError` and
    ``CancelledError``.

    Leaving the ``async with`` block early, ``aclose()`` or a cancelled read closes the
    connection, so the server sees the client go. A stream that ran to its end returns its
    connection to the pool.

    Subclasses make the attempts (:meth:`_new_attempt`); :class:`HTTPStream` is the one for
    HTTP endpoints.
    """

    __slots__ = ("_reader", "_request", "_settings", "_state", "_timings", "_total_dl")

    def __init__(self, settings: StreamSettings, request: ChatRequest) -> None:
        self._settings = settings
        self._request = request
        self._state = _NEW
        self._timings = StreamTimings()
        self._reader: Attempt | None = None
        self._total_dl = _INF

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} provider={self._settings.name!r} "
            f"model={self._request.model!r} state={_STATE_NAMES[self._state]}>"
        )

    def _new_attempt(self) -> Attempt:
        """A fresh attempt, not yet opened."""
        raise NotImplementedError

    @property
    def total_deadline(self) -> float:
        """When the ``total`` timeout ends the stream, on ``time.monotonic()``."""
        return self._total_dl

    # -- the ProviderStream protocol -------------------------------------------------------

    @property
    def finish_reason(self) -> str | None:
        """The finish reason the server sent, once it has."""
        reader = self._reader
        return reader.finish_reason if reader is not None else None

    @property
    def usage(self) -> Usage | None:
        """The server's token counts, or an estimate (``estimated=True``) if it sent none.

        The estimate counts the prompt with :func:`estimate_prompt_tokens` and the output's
        characters (content and reasoning) with :func:`~moa_stream.estimate_tokens`, the same
        rule as every other estimate in the package. ``None`` before the stream started.
        """
        reader = self._reader
        if reader is not None and reader.usage is not None:
            return reader.usage
        if self._state == _NEW:
            return None
        return Usage(
            estimate_prompt_tokens(self._request.messages),
            estimate_tokens(reader.output_chars) if reader is not None else 0,
            estimated=True,
        )

    @property
    def timings(self) -> StreamTimings:
        """Timestamps of this stream on ``time.monotonic()``; see :class:`StreamTimings`."""
        return self._timings

    @property
    def request_id(self) -> str | None:
        """The upstream's request id of the last attempt, if it sent one."""
        reader = self._reader
        return reader.request_id if reader is not None else None

    @property
    def connection_reused(self) -> bool:
        """Whether the last attempt went out on a pooled keep-alive connection."""
        reader = self._reader
        return reader.reused if reader is not None else False

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Delta:
        reader = self._reader
        state = self._state
        if state == _OPEN and reader is not None:
            # Events already read are handed out without any await.
            try:
                delta = reader.take()
            except ProviderError as exc:
                self._fail(exc)
                raise
            if delta is not None:
                return delta
        elif state != _NEW and state != _OPEN:
            raise StopAsyncIteration
        return await self._guard(self._next_from_network())

    async def __aenter__(self) -> Self:
        if self._state == _NEW:
            await self._guard(self._connect())
        return self

    async def aclose(self) -> None:
        """Close the stream and its connection. Safe to call more than once."""
        if self._state == _OPEN:
            self._close(_CLOSED)
        elif self._state == _NEW:
            self._state = _CLOSED

    # -- internals ---------------------------------------------------------------------------

    async def _guard(self, step: Awaitable[_T]) -> _T:
        """Run a step that may touch the network, ending the stream the way it failed."""
        try:
            return await step
        except StopAsyncIteration:
            reader = self._reader
            try:
                if reader is not None:
                    await reader.finish()
            finally:
                self._close(_ENDED)
            raise
        except ProviderError as exc:
            self._fail(exc)
            raise
        except BaseException:
            self._close(_CLOSED)
            raise

    async def _connect(self) -> Attempt:
        """Send attempts until one has its response headers (retrying what may be retried)."""
        if self._state == _NEW:
            self._state = _OPEN
            now = _monotonic()
            self._timings.started = now
            total = self._settings.timeouts.total
            self._total_dl = now + total if total is not None else _INF
        while True:
            self._reader = reader = self._new_attempt()
            try:
                await reader.open()
            except ProviderError as exc:
                await self._retry_or_raise(exc)
            else:
                return reader

    async def _next_from_network(self) -> Delta:
        while True:
            reader = self._reader
            if reader is None:
                reader = await self._connect()
            try:
                await reader.fill()
                delta = reader.take()
            except ProviderError as exc:
                await self._retry_or_raise(exc)
                self._reader = None
                continue
            if delta is not None:
                return delta

    async def _retry_or_raise(self, exc: ProviderError) -> None:
        """Drop the current attempt; raise ``exc`` unless it should be retried, else back off."""
        reader = self._reader
        assert reader is not None
        reader.close()
        self._contextualize(exc)
        if reader.delivered:
            raise exc
        retry = self._settings.retry
        attempts = self._timings.attempts
        if (
            not isinstance(exc, TransientError)
            or isinstance(exc, TotalTimeout)
            or attempts >= retry.max_attempts
        ):
            raise exc
        if exc.retry_after is not None:
            if exc.retry_after > retry.max_retry_after:
                raise exc
            delay = exc.retry_after
        elif reader.reused and isinstance(exc, ConnectError):
            # A pooled connection the server had already closed: nothing is wrong upstream.
            delay = 0.0
        else:
            delay = retry.delay(attempts, self._settings.rng())
        if _monotonic() + delay >= self._total_dl:
            raise exc
        _log.info(
            "provider.retry",
            provider=self._settings.name,
            model=self._request.model,
            attempt=attempts,
            delay=round(delay, 3),
            error=exc.kind,
            status=exc.status,
        )
        await self._settings.sleep(delay)

    def _contextualize(self, exc: ProviderError) -> None:
        reader = self._reader
        if exc.provider is None:
            exc.provider = self._settings.name
        if exc.model is None:
            exc.model = self._request.model
        if reader is not None:
            if exc.status is None:
                exc.status = reader.status
            if exc.request_id is None:
                exc.request_id = reader.request_id
            exc.delivered = reader.delivered
        # Every upstream-supplied field of the error reaches clients (a 502 body, a
        # proposer.failed item) and the log through str(exc): masked and bounded, whichever
        # way it was made (an error frame's code, an id header, an adapter's own error).
        settings = self._settings
        if exc.request_id:
            exc.request_id = settings.clean(exc.request_id)
        if exc.code:
            exc.code = settings.clean(exc.code)
        if exc.error_type:
            exc.error_type = settings.clean(exc.error_type)
        if isinstance(exc, ContextLengthError) and exc.estimated_prompt_tokens is not None:
            return  # already masked, cut and explained (an error passes here more than once)
        # Mask the key first, then cut: a key straddling the cut would leave its start behind.
        message = self._settings.redact(exc.message)[:MAX_ERROR_CHARS]
        if message != exc.message:
            exc.message = message
            exc.args = (message,)
        if isinstance(exc, ContextLengthError):
            _explain_overflow(exc, self._request.messages)

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

    def _close(self, state: int) -> None:
        self._state = state
        reader = self._reader
        if reader is not None:
            reader.close()
        if self._timings.end is None:
            self._timings.end = _monotonic()


def _explain_overflow(exc: ContextLengthError, messages: Sequence[ChatMessage]) -> None:
    """Say in the error how big the prompt was and what to change."""
    estimate = estimate_prompt_tokens(messages)
    chars = sum(len(m["content"]) for m in messages if isinstance(m.get("content"), str))
    exc.estimated_prompt_tokens = estimate
    figures = []
    if exc.prompt_tokens is not None:
        figures.append(f"the server counted {exc.prompt_tokens} prompt tokens")
    if exc.context_window is not None:
        figures.append(f"its context window is {exc.context_window} tokens")
    said = f" ({', '.join(figures)})" if figures else ""
    exc.message = (
        f"{exc.message}. The prompt is about {estimate} tokens (estimated from {chars:,} "
        f"characters in {len(messages)} messages){said}: shorten the conversation, or lower "
        "max_reference_chars so that an aggregator's references fit"
    )
    exc.args = (exc.message,)


class HTTPStream(RetryingStream):
    """A :class:`RetryingStream` whose attempts are HTTP requests on a provider's pool.

    ``body`` encodes the request, called once on the first attempt (its errors end the stream
    like any other). Wire formats subclass it with :meth:`_parser`: a parser per attempt.
    """

    __slots__ = ("_body", "_pool")

    def __init__(
        self,
        settings: StreamSettings,
        pool: ConnectionPool,
        request: ChatRequest,
        body: Callable[[], bytes],
    ) -> None:
        super().__init__(settings, request)
        self._pool = pool
        self._body: bytes | Callable[[], bytes] = body

    def _parser(self) -> EventParser:
        raise NotImplementedError

    def _new_attempt(self) -> ResponseReader:
        body = self._body
        if not isinstance(body, bytes):
            body = self._body = body()
        return ResponseReader(
            self._settings, self._pool, body, self._parser(), self._timings, self._total_dl
        )
