"""A provider that streams through LiteLLM (``litellm.acompletion(stream=True)``), so any of
LiteLLM's backends can be a proposer or an aggregator. Needs the ``litellm`` extra.

The stream is the library's own :class:`~moa_stream.providers._retry.RetryingStream`: the same
four timeouts, the same retries before the first delta and the same errors as
:class:`~moa_stream.providers.OpenAIProvider`; LiteLLM's own retries are turned off so the two
never multiply. LiteLLM's exceptions are translated here, at this provider's one boundary.

Cost: LiteLLM builds a pydantic object per chunk and runs its logging hooks; measured per chunk
against :class:`~moa_stream.providers.OpenAIProvider` in ``benchmarks/provider_throughput.py
--litellm`` (see ``docs/providers.md``). Use it for backends the native providers don't speak.
"""

from __future__ import annotations

import asyncio
import importlib
import math
import os
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, Final

from moa_stream._exceptions import (
    AuthenticationError,
    ConfigError,
    ConnectError,
    ConnectTimeout,
    ContextLengthError,
    IdleTimeout,
    ModelNotFoundError,
    ProtocolError,
    ProviderClosedError,
    ProviderError,
    RateLimitError,
    RequestRejectedError,
    ServerError,
    StreamInterruptedError,
    TruncatedStreamError,
    UpstreamError,
)
from moa_stream._resource import AsyncResource
from moa_stream._types import ChatRequest, Delta, StreamTimings, Usage, sampling_fields
from moa_stream._wire import parse_retry_after
from moa_stream.providers._base import check_continuation
from moa_stream.providers._chunks import context_length_error, make_delta
from moa_stream.providers._errors import (
    connect_timeout,
    first_token_timeout,
    idle_timeout,
    status_error_class,
    total_timeout,
)
from moa_stream.providers._http import AttemptState, StreamSettings, api_key_from
from moa_stream.providers._policy import RetrySettings, Timeouts
from moa_stream.providers._retry import RetryingStream

__all__ = ["LiteLLMProvider", "LiteLLMStream"]

_INF: Final = math.inf
_monotonic = time.monotonic
#: Closes of abandoned attempts still running (held so that they are not collected midway).
_closing: set[asyncio.Task[None]] = set()


def _import_litellm() -> Any:
    # Without this, importing LiteLLM fetches its model price list from the internet.
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    try:
        litellm: Any = importlib.import_module("litellm")
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ConfigError("needs LiteLLM: pip install 'moa_stream[litellm]'", path="kind") from exc
    # Its errors are ours to report, not to be printed with a help banner on stdout.
    litellm.suppress_debug_info = True
    return litellm


def _translate(exc: Exception, *, started: bool) -> ProviderError:
    """One of LiteLLM's exceptions (OpenAI-SDK shaped, with ``status_code``) as ours."""
    original = getattr(exc, "original_exception", None)
    if type(exc).__name__ == "MidStreamFallbackError" and isinstance(original, Exception):
        return _translate(original, started=started)
    name = type(exc).__name__
    message = str(getattr(exc, "message", "") or exc) or name
    status = getattr(exc, "status_code", None)
    status = status if isinstance(status, int) else None
    if name == "ContextWindowExceededError":
        return ContextLengthError(message, status=status)
    headers: Mapping[str, str] = {}
    response = getattr(exc, "response", None)
    if response is not None and getattr(response, "headers", None) is not None:
        headers = {k.lower(): v for k, v in response.headers.items()}
    if name in ("Timeout", "APITimeoutError"):
        return ConnectTimeout(message) if not started else IdleTimeout(message)
    if name == "APIConnectionError" or (status is None and name.endswith("ConnectionError")):
        if started:
            return StreamInterruptedError(message)
        return ConnectError(message)
    if status is None:
        return UpstreamError(message) if started else ConnectError(message)
    cls = status_error_class(status)
    if cls in (RateLimitError, ServerError):
        return cls(message, status=status, retry_after=parse_retry_after(headers))
    if cls in (AuthenticationError, ModelNotFoundError):
        return cls(message, status=status)
    overflow = context_length_error(message, None, None)
    if overflow is not None:
        overflow.status = status
        return overflow
    return RequestRejectedError(message, status=status)


class _LiteLLMAttempt(AttemptState):
    """One ``acompletion`` call, read one chunk at a time."""

    __slots__ = ("_chunks", "_kwargs", "_litellm", "_next", "_pending", "_stream")

    def __init__(
        self,
        litellm: Any,
        settings: StreamSettings,
        kwargs: dict[str, Any],
        timings: StreamTimings,
        total_deadline: float,
    ) -> None:
        super().__init__(settings, timings, total_deadline)
        self._litellm = litellm
        self._kwargs = kwargs
        self._stream: Any = None
        self._chunks: AsyncIterator[Any] | None = None
        self._pending: Delta | None = None
        self._next = _INF  # deadline of the next chunk

    def _deadline(self, limit: float | None) -> float:
        dl = _monotonic() + limit if limit is not None else _INF
        return min(dl, self._total_dl)

    async def open(self) -> None:
        timeouts = self._settings.timeouts
        self._timings.attempts += 1
        start = _monotonic()
        self._timings.request_sent = start
        deadline = self._deadline(timeouts.connect)
        try:
            async with asyncio.timeout_at(_to_loop_time(deadline)):
                self._stream = await self._litellm.acompletion(**self._kwargs)
        except TimeoutError as exc:
            raise self._timeout(deadline, connect=True) from exc
        except Exception as exc:  # LiteLLM's errors, translated at this boundary
            raise _translate(exc, started=False) from exc
        self._timings.headers = _monotonic()
        self.status = 200
        self._chunks = aiter(self._stream)
        first = timeouts.first_token
        self._next = min(start + first if first is not None else _INF, self._total_dl)

    def take(self) -> Delta | None:
        delta, self._pending = self._pending, None
        return delta

    async def fill(self) -> None:
        chunks = self._chunks
        assert chunks is not None
        deadline = self._next
        while True:
            try:
                async with asyncio.timeout_at(_to_loop_time(deadline)):
                    chunk = await anext(chunks)
            except StopAsyncIteration:
                if self.finish_reason is None:
                    raise TruncatedStreamError("the stream ended before a finish_reason") from None
                raise
            except TimeoutError as exc:
                raise self._timeout(deadline) from exc
            except Exception as exc:
                raise _translate(exc, started=True) from exc
            now = _monotonic()
            idle = self._settings.timeouts.idle
            deadline = self._next = min(now + idle if idle is not None else _INF, self._total_dl)
            if not self.delivered:
                first = self._settings.timeouts.first_token
                if first is not None:
                    sent = self._timings.request_sent or now
                    deadline = min(deadline, sent + first)
            delta = self._delta(chunk)
            if delta is None:
                continue
            self._timings.chunk_times.append(now)
            self.delivered = True
            if delta.content:
                self.output_chars += len(delta.content)
                if self._timings.first_token is None:
                    self._timings.first_token = now
            if delta.reasoning:
                self.output_chars += len(delta.reasoning)
            if delta.finish_reason is not None:
                self.finish_reason = delta.finish_reason
            if delta.usage is not None:
                self.usage = delta.usage
            self._pending = delta
            return

    def _delta(self, chunk: Any) -> Delta | None:
        if self.request_id is None:
            self.request_id = getattr(chunk, "id", None)
        content = reasoning = ""
        finish: str | None = None
        choices = getattr(chunk, "choices", None) or ()
        if choices:
            choice = choices[0]
            delta = getattr(choice, "delta", None)
            if delta is not None:
                content = getattr(delta, "content", None) or ""
                reasoning = getattr(delta, "reasoning_content", None) or ""
            finish = getattr(choice, "finish_reason", None) or None
        usage = None
        raw = getattr(chunk, "usage", None)
        if raw is not None:
            details = getattr(raw, "prompt_tokens_details", None)
            usage = Usage(
                int(getattr(raw, "prompt_tokens", 0) or 0),
                int(getattr(raw, "completion_tokens", 0) or 0),
                cached_prompt_tokens=int(getattr(details, "cached_tokens", 0) or 0),
            )
        if not isinstance(content, str) or not isinstance(reasoning, str):
            raise ProtocolError("LiteLLM chunk content is not text")
        if content or reasoning or finish or usage is not None:
            return make_delta(content, reasoning, finish, usage)
        return None

    async def finish(self) -> None:
        await self._aclose()

    def close(self) -> None:
        stream = self._stream
        if stream is not None and hasattr(stream, "aclose"):
            # Abandoning an attempt must not block, yet the HTTP response underneath must be
            # closed so that the server sees the client go: close it in a task of its own.
            task = asyncio.get_running_loop().create_task(self._aclose(stream))
            _closing.add(task)
            task.add_done_callback(_closing.discard)
        self._stream = None
        self._chunks = None

    async def _aclose(self, stream: Any = None) -> None:
        stream = stream or self._stream
        self._stream = None
        self._chunks = None
        if stream is not None and hasattr(stream, "aclose"):
            await stream.aclose()

    def _timeout(self, deadline: float, *, connect: bool = False) -> ProviderError:
        timeouts = self._settings.timeouts
        if deadline >= self._total_dl:
            return total_timeout(timeouts)
        if connect:
            return connect_timeout(timeouts)
        if not self.delivered:
            return first_token_timeout(timeouts)
        return idle_timeout(timeouts)


def _to_loop_time(deadline: float) -> float | None:
    """A ``time.monotonic()`` deadline on the running loop's clock (None: no deadline)."""
    if deadline == _INF:
        return None
    loop = asyncio.get_running_loop()
    return loop.time() + (deadline - _monotonic())


class LiteLLMStream(RetryingStream):
    """One streamed completion through LiteLLM; behaves as
    :class:`~moa_stream.providers.OpenAIStream` does."""

    __slots__ = ("_kwargs", "_litellm", "_provider")

    def __init__(
        self,
        provider: LiteLLMProvider,
        settings: StreamSettings,
        request: ChatRequest,
        litellm: Any,
        kwargs: dict[str, Any],
    ) -> None:
        super().__init__(settings, request)
        self._provider = provider
        self._litellm = litellm
        self._kwargs = kwargs

    def _new_attempt(self) -> _LiteLLMAttempt:
        if self._provider.closed:
            raise ProviderClosedError("the provider is closed")
        return _LiteLLMAttempt(
            self._litellm, self._settings, self._kwargs, self._timings, self._total_dl
        )


class LiteLLMProvider(AsyncResource):
    """Any backend LiteLLM speaks, streamed through ``litellm.acompletion(stream=True)``.

    The request's ``model`` is LiteLLM's model string (``"anthropic/claude-..."``,
    ``"ollama/llama3"``, ``"openai/<name>"`` for any OpenAI-compatible server ...).
    ``api_base`` and ``api_key`` (or the variable named by ``api_key_env``, read once here) are
    passed to every call, as are ``options`` (any other ``acompletion`` argument); the request's
    ``extra`` fields too. ``name``, ``timeouts``, ``retry``, ``sleep`` and ``rng`` mean what
    they mean for :class:`~moa_stream.providers.OpenAIProvider`. ``continuation`` is
    ``("turns",)`` unless set: whether a trailing assistant message is continued depends on the
    backend.
    """

    def __init__(
        self,
        *,
        name: str = "litellm",
        api_base: str | None = None,
        api_key: str | None = None,
        api_key_env: str | None = None,
        options: Mapping[str, Any] | None = None,
        timeouts: Timeouts | None = None,
        retry: RetrySettings | None = None,
        continuation: Sequence[str] = ("turns",),
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self._api_key = api_key_from(api_key, api_key_env)
        self._litellm = _import_litellm()
        self._name = name
        self._api_base = api_base
        self._options = dict(options or {})
        self.continuation = check_continuation(tuple(continuation))
        self._settings = StreamSettings(
            name=name,
            timeouts=timeouts or Timeouts(),
            retry=retry or RetrySettings(),
            secret=self._api_key,
            sleep=sleep,
            rng=rng,
        )
        self._closed = False

    @property
    def name(self) -> str:
        return self._name

    @property
    def closed(self) -> bool:
        return self._closed

    def __repr__(self) -> str:
        return f"LiteLLMProvider(name={self._name!r}, api_base={self._api_base!r})"

    def stream(self, request: ChatRequest) -> LiteLLMStream:
        """A stream for ``request``; nothing is sent until it is entered or iterated."""
        kwargs: dict[str, Any] = {
            **self._options,
            "model": request.model,
            "messages": list(request.messages),
            "stream": True,
            "stream_options": {"include_usage": True},
            # Retries are the stream's, before the first token only.
            "num_retries": 0,
            "max_retries": 0,
        }
        if self._api_base is not None:
            kwargs["api_base"] = self._api_base
        if self._api_key is not None:
            kwargs["api_key"] = self._api_key
        kwargs.update(sampling_fields(request))
        kwargs.update(request.extra)
        return LiteLLMStream(self, self._settings, request, self._litellm, kwargs)

    async def prewarm(self) -> None:
        """Nothing to do: LiteLLM owns its connections."""

    async def aclose(self) -> None:
        """Refuse new streams. LiteLLM's shared clients stay LiteLLM's to close."""
        self._closed = True
