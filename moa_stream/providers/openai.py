"""A provider for any OpenAI-compatible ``/chat/completions`` endpoint, over aiohttp.

Layers, from the socket up: :class:`~moa_stream.providers._http.ResponseReader` reads one
attempt's body into the I/O-free :class:`~moa_stream.providers.sse.SSEDecoder`; each event's data
goes through the pure ``parse_chunk``; :class:`OpenAIStream` retries attempts before the first
delta (:mod:`moa_stream.providers._retry`). Only the request body and the chunk format are
OpenAI's: this module has no transport code.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, ClassVar, Literal

import aiohttp
import orjson
import structlog
import yarl

from moa_stream._exceptions import ConfigError, RequestRejectedError, UsageError
from moa_stream._resource import AsyncResource
from moa_stream._types import ChatRequest, Delta
from moa_stream.providers._base import Continuation
from moa_stream.providers._chunks import Done, parse_chunk, parse_completion, upstream_error
from moa_stream.providers._http import ConnectionPool, Endpoint
from moa_stream.providers._policy import RetryPolicy, Timeouts
from moa_stream.providers._retry import RetryingStream
from moa_stream.providers.sse import SSEEvent

__all__ = ["OpenAIProvider", "OpenAIStream", "RetryPolicy", "Timeouts"]

_log = structlog.get_logger("moa_stream.providers")


class _OpenAIParser:
    """Chat-completion chunks: stateless, so one instance serves every attempt."""

    __slots__ = ()

    data = staticmethod(parse_chunk)
    completion = staticmethod(parse_completion)

    @staticmethod
    def event(event: SSEEvent) -> Delta | Done | None:
        # Named events: llama.cpp's old ``error:`` field; anything else is read as a chunk.
        if event.event == "error":
            raise upstream_error(event.data)
        return parse_chunk(event.data)


_PARSER = _OpenAIParser()


class OpenAIStream(RetryingStream):
    """One streamed chat completion from an :class:`OpenAIProvider`; see
    :class:`~moa_stream.providers._retry.RetryingStream` for its behaviour."""

    __slots__ = ()

    def _parser(self) -> _OpenAIParser:
        return _PARSER


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

    ``continuation`` says how an answer can be continued on this endpoint: ``"append"`` (a new
    turn after the partial answer; works everywhere) or ``"prefill"`` (the last assistant
    message is continued: llama.cpp's llama-server, vLLM with ``continue_final_message``).
    OpenAI itself has no prefill, hence the default.

    ``sleep`` and ``rng`` (a callable returning a float in [0, 1)) are the back-off's sleep
    and jitter source; tests pass their own to make retries instant and deterministic.

    One keep-alive connection pool per provider, created on first use inside the running event
    loop; use the provider from that loop only. Close it with ``aclose()`` or
    ``async with``.
    """

    #: How this provider's answers can be continued; see the class docstring.
    continuation: Continuation

    #: The default of ``continuation``.
    default_continuation: ClassVar[Continuation] = "append"

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
        continuation: Continuation | None = None,
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
        if continuation not in (None, "append", "prefill"):
            raise ConfigError(
                f"must be 'append' or 'prefill', got {continuation!r}", path="continuation"
            )
        if api_key is None and api_key_env is not None:
            api_key = os.environ.get(api_key_env)
            if not api_key:
                raise ConfigError(f"environment variable {api_key_env} is not set", path="api_key")
        api_key = api_key or None
        self._base_url = url
        self._models_url = url / "models"
        self._name = name or (f"{url.host}:{url.explicit_port}" if url.explicit_port else url.host)
        self.max_tokens_field = max_tokens_field
        self.stream_options_usage = stream_options_usage
        self.continuation = continuation or self.default_continuation
        common: dict[str, str] = {}
        if api_key:
            common["Authorization"] = f"Bearer {api_key}"
        common.update(headers or {})
        # Compression makes proxies and servers buffer an event stream: ask for none.
        stream_headers = {
            "Accept": "text/event-stream",
            "Content-Type": "application/json",
            "Accept-Encoding": "identity",
            **common,
        }
        self._get_headers = {"Accept": "application/json", **common}
        self._endpoint = Endpoint(
            name=self._name,
            url=url / "chat" / "completions",
            headers=stream_headers,
            timeouts=timeouts or Timeouts(),
            retry=retry or RetryPolicy(),
            secret=api_key,
            sleep=sleep,
            rng=rng,
        )
        self._pool = ConnectionPool(limit)

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
        return f"OpenAIProvider(name={self._name!r}, base_url={str(self._base_url)!r})"

    def stream(self, request: ChatRequest) -> OpenAIStream:
        """A stream for ``request``; nothing is sent until it is entered or iterated."""
        return OpenAIStream(self._endpoint, self._pool, request, lambda: self._encode(request))

    async def prewarm(self, connections: int = 1) -> None:
        """Open ``connections`` pooled keep-alive connections before they are needed.

        Each is opened by a ``GET {base_url}/models`` read to its end, so the connection goes
        back to the pool; a later request then skips TCP (and TLS) set-up. Connections already
        idle in the pool count: a busy provider's pool is warm, and a prewarm request would
        only add load. Failures are logged at debug level and otherwise ignored: a prewarm is
        only ever an optimisation.
        """
        await prewarm_pool(
            self._pool, self._name, self._models_url, self._get_headers, self.timeouts, connections
        )

    async def aclose(self) -> None:
        """Close every pooled connection. Safe to call more than once."""
        await self._pool.aclose()

    def _encode(self, request: ChatRequest) -> bytes:
        messages = request.messages
        body: dict[str, Any] = {
            "model": request.model,
            "messages": messages if isinstance(messages, list | tuple) else list(messages),
            "stream": True,
        }
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.max_tokens is not None:
            body[self.max_tokens_field] = request.max_tokens
        if request.stop:
            body["stop"] = request.stop
        if self.stream_options_usage:
            body["stream_options"] = {"include_usage": True}
        body.update(request.extra)
        try:
            return orjson.dumps(body)
        except TypeError as exc:
            raise RequestRejectedError(f"the request cannot be encoded as JSON: {exc}") from exc


async def prewarm_pool(
    pool: ConnectionPool,
    name: str,
    url: yarl.URL,
    headers: Mapping[str, str],
    timeouts: Timeouts,
    connections: int,
) -> None:
    """Open up to ``connections`` keep-alive connections with ``GET url``, counting those
    already idle in ``pool``; failures are logged at debug level and ignored."""
    try:
        session = pool.session()
    except UsageError as exc:
        _log.debug("provider.prewarm_failed", provider=name, error=str(exc))
        return
    connections -= pool.idle_connections()
    if connections <= 0:
        return

    async def one() -> None:
        try:
            async with asyncio.timeout(timeouts.connect):
                resp = await session.get(url, headers=headers, allow_redirects=False)
                try:
                    await resp.read()
                except BaseException:
                    resp.close()
                    raise
                pool.release(resp)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            _log.debug("provider.prewarm_failed", provider=name, error=type(exc).__name__)

    if connections == 1:
        await one()
        return
    async with asyncio.TaskGroup() as group:
        for _ in range(connections):
            group.create_task(one())
