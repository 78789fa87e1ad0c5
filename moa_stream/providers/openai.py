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
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Literal

import aiohttp
import orjson
import structlog
import yarl

from moa_stream._exceptions import ConfigError, RequestRejectedError, UsageError
from moa_stream._types import ChatRequest, Delta
from moa_stream._wire import chat_request_body
from moa_stream.providers._base import check_continuation
from moa_stream.providers._chunks import Done, parse_chunk, parse_completion, upstream_error
from moa_stream.providers._http import ConnectionPool, PooledHTTPProvider, StreamSettings
from moa_stream.providers._policy import RetryPolicy, RetrySettings, Timeouts
from moa_stream.providers._retry import HTTPStream
from moa_stream.providers.sse import SSEEvent

__all__ = ["OpenAIProvider", "OpenAIStream", "RetryPolicy", "RetrySettings", "Timeouts"]

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


class OpenAIStream(HTTPStream):
    """One streamed chat completion from an :class:`OpenAIProvider`; see
    :class:`~moa_stream.providers._retry.RetryingStream` for its behaviour."""

    __slots__ = ()

    def _parser(self) -> _OpenAIParser:
        return _PARSER


class OpenAIProvider(PooledHTTPProvider):
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

    ``continuation`` lists how an answer can be continued on this endpoint, in the staircase's
    notation (see :func:`~moa_stream.providers._base.check_continuation`): ``("turns",)`` by
    default, since OpenAI itself has no prefill; add ``"prefill:llama"`` for llama.cpp's
    llama-server or ``"prefill:vllm"`` for vLLM.

    ``sleep`` and ``rng`` (a callable returning a float in [0, 1)) are the back-off's sleep
    and jitter source; tests pass their own to make retries instant and deterministic.

    One keep-alive connection pool per provider, created on first use inside the running event
    loop; use the provider from that loop only. Close it with ``aclose()`` or
    ``async with``.
    """

    #: How this provider's answers can be continued; see the class docstring.
    continuation: tuple[str, ...]

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
        retry: RetrySettings | None = None,
        stream_options_usage: bool = True,
        limit: int = 100,
        continuation: Sequence[str] = ("turns",),
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
        api_key = api_key or None
        self._base_url = url
        self._models_url = url / "models"
        self._name = name or (f"{url.host}:{url.explicit_port}" if url.explicit_port else url.host)
        self.max_tokens_field = max_tokens_field
        self.stream_options_usage = stream_options_usage
        self.continuation = check_continuation(tuple(continuation))
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
        self._settings = StreamSettings(
            name=self._name,
            url=url / "chat" / "completions",
            headers=stream_headers,
            timeouts=timeouts or Timeouts(),
            retry=retry or RetrySettings(),
            secret=api_key,
            sleep=sleep,
            rng=rng,
        )
        self._pool = ConnectionPool(limit)

    def stream(self, request: ChatRequest) -> OpenAIStream:
        """A stream for ``request``; nothing is sent until it is entered or iterated."""
        return OpenAIStream(self._settings, self._pool, request, lambda: self._encode(request))

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
