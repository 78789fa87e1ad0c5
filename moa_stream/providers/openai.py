"""A provider for any OpenAI-compatible ``/chat/completions`` endpoint, over aiohttp.

Layers, from the socket up: :class:`~moa_stream.providers._http.ResponseReader` reads one
attempt's body into the I/O-free :class:`~moa_stream.providers.sse.SSEDecoder`; each event's data
goes through the pure ``parse_chunk``; :class:`OpenAIStream` retries attempts before the first
delta (:mod:`moa_stream.providers._retry`). Only the request body and the chunk format are
OpenAI's: this module has no transport code.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Literal

import structlog

from moa_stream._exceptions import ConfigError
from moa_stream._types import ChatRequest, Delta
from moa_stream._wire import chat_request_body
from moa_stream.providers._base import check_continuation
from moa_stream.providers._chunks import Done, parse_chunk, parse_completion, upstream_error
from moa_stream.providers._http import PooledHTTPProvider, api_key_from, api_root, json_body
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


class OpenAIProvider(PooledHTTPProvider[OpenAIStream]):
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

    _stream_type = OpenAIStream
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
        url = api_root(base_url)
        if max_tokens_field not in ("max_tokens", "max_completion_tokens"):
            raise ConfigError(
                f"must be 'max_tokens' or 'max_completion_tokens', got {max_tokens_field!r}",
                path="max_tokens_field",
            )
        api_key = api_key_from(api_key, api_key_env)
        self.max_tokens_field = max_tokens_field
        self.stream_options_usage = stream_options_usage
        self.continuation = check_continuation(tuple(continuation))
        self._setup(
            url,
            name=name,
            stream_url=url / "chat" / "completions",
            models_url=url / "models",
            api_key=api_key,
            headers=headers,
            timeouts=timeouts,
            retry=retry,
            limit=limit,
            sleep=sleep,
            rng=rng,
        )

    def _encode(self, request: ChatRequest) -> bytes:
        body = chat_request_body(
            request,
            stream=True,
            max_tokens_field=self.max_tokens_field,
            include_usage=self.stream_options_usage,
        )
        return json_body(body)
