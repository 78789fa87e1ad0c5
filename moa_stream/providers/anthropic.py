"""A provider for Anthropic's Messages API (``POST /v1/messages``), streamed, over aiohttp.

The transport, the four timeouts and the retries before the first delta are the ones
:class:`~moa_stream.providers.OpenAIProvider` uses (``_http.ResponseReader`` under
``_retry.RetryingStream``); this module only encodes the request and reads Anthropic's events:

* ``message_start`` carries the prompt's usage (``input_tokens``, and the prompt-cache figures
  ``cache_read_input_tokens`` and ``cache_creation_input_tokens``);
* ``content_block_start`` / ``content_block_delta`` / ``content_block_stop``: ``text_delta``
  is content, ``thinking_delta`` is reasoning (never content); other deltas (signatures, tool
  input) carry nothing for the caller;
* ``message_delta`` carries ``stop_reason`` and the output token count, ``message_stop`` ends
  the answer; ``ping`` and unknown events are skipped;
* ``error`` events (``overloaded_error`` ...) arrive after status 200: an overload or an API
  error is a :class:`~moa_stream.ServerError` (so retried if nothing was delivered yet), a rate
  limit a :class:`~moa_stream.RateLimitError`, "prompt is too long" a
  :class:`~moa_stream.ContextLengthError`. HTTP 429 and 529 come with ``retry-after``.

System messages become the top-level ``system`` field. A trailing assistant message is
continued by the model (prefill), so ``continuation`` is ``("prefill:anthropic", "turns")``.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, ClassVar, Final

import orjson
import yarl

from moa_stream._exceptions import (
    ConfigError,
    ProtocolError,
    ProviderError,
    RateLimitError,
    RequestRejectedError,
    ServerError,
    UpstreamError,
)
from moa_stream._types import ChatRequest, Delta, Usage, content_text
from moa_stream.providers._chunks import DONE, Done, context_length_error, error_fields, make_delta
from moa_stream.providers._http import PooledHTTPProvider, api_key_from, api_root, json_body
from moa_stream.providers._policy import RetrySettings, Timeouts
from moa_stream.providers._retry import HTTPStream
from moa_stream.providers.sse import SSEEvent

__all__ = ["AnthropicProvider", "AnthropicStream"]

_loads = orjson.loads

#: Anthropic's stop reasons in the OpenAI vocabulary the rest of the library speaks.
_STOP_REASONS: Final = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}


def _count(usage: Mapping[str, Any], key: str) -> int:
    value = usage.get(key)
    if value is None:
        return 0
    if type(value) is not int:
        raise ProtocolError(f"usage.{key} is {type(value).__name__}, not an integer")
    return value


def _json_object(data: str | bytes, what: str) -> dict[str, Any]:
    """``data`` parsed, when it is a JSON object; else the :class:`ProtocolError` naming
    ``what`` it was (a stream event, a response body)."""
    try:
        obj = _loads(data)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"invalid JSON in {what}: {exc}") from exc
    if type(obj) is not dict:
        raise ProtocolError(f"{what} is {type(obj).__name__}, not an object")
    return obj


def _event_error(obj: Mapping[str, Any]) -> ProviderError:
    """The error for an ``error`` event inside a 200 stream."""
    fields = error_fields(obj)
    message, _, error_type = fields if fields is not None else ("upstream error", None, None)
    overflow = context_length_error(message, None, error_type, obj)
    if overflow is not None:
        return overflow
    if error_type in ("overloaded_error", "api_error"):
        return ServerError(message, error_type=error_type)
    if error_type == "rate_limit_error":
        return RateLimitError(message, error_type=error_type)
    return UpstreamError(message, error_type=error_type)


class _MessagesParser:
    """The events of one Messages stream. Stateful: the prompt's usage arrives first, the
    output's last, and the delta carrying usage reports both."""

    __slots__ = ("_prompt_usage",)

    def __init__(self) -> None:
        self._prompt_usage: tuple[int, int] = (0, 0)  # (all prompt tokens, cache reads)

    def event(self, event: SSEEvent) -> Delta | Done | None:
        return self.data(event.data)

    def data(self, data: str) -> Delta | Done | None:
        obj = _json_object(data, "stream event")
        kind = obj.get("type")
        if kind == "content_block_delta":
            delta = obj.get("delta")
            if type(delta) is not dict:
                raise ProtocolError("content_block_delta without a delta object")
            delta_type = delta.get("type")
            if delta_type == "text_delta":
                text = delta.get("text")
                if type(text) is not str:
                    raise ProtocolError("text_delta.text is not a string")
                return make_delta(text, "", None, None) if text else None
            if delta_type == "thinking_delta":
                thinking = delta.get("thinking")
                if type(thinking) is not str:
                    raise ProtocolError("thinking_delta.thinking is not a string")
                return make_delta("", thinking, None, None) if thinking else None
            return None  # signature_delta, input_json_delta, citations_delta ...
        if kind == "message_start":
            message = obj.get("message")
            usage = message.get("usage") if type(message) is dict else None
            if type(usage) is dict:
                cache_read = _count(usage, "cache_read_input_tokens")
                prompt = (
                    _count(usage, "input_tokens")
                    + cache_read
                    + _count(usage, "cache_creation_input_tokens")
                )
                self._prompt_usage = (prompt, cache_read)
            return None
        if kind == "message_delta":
            delta = obj.get("delta")
            stop = delta.get("stop_reason") if type(delta) is dict else None
            if stop is not None and type(stop) is not str:
                raise ProtocolError(f"stop_reason is {type(stop).__name__}, not a string")
            usage = obj.get("usage")
            result: Usage | None = None
            if type(usage) is dict:
                prompt, cached = self._prompt_usage
                # Newer servers repeat the input figures here; the start's are used otherwise.
                if "input_tokens" in usage:
                    cached = _count(usage, "cache_read_input_tokens") or cached
                    prompt = (
                        _count(usage, "input_tokens")
                        + _count(usage, "cache_read_input_tokens")
                        + _count(usage, "cache_creation_input_tokens")
                    ) or prompt
                result = Usage(prompt, _count(usage, "output_tokens"), cached_prompt_tokens=cached)
            finish = _STOP_REASONS.get(stop, stop) if stop else None
            if finish is None and result is None:
                return None
            return make_delta("", "", finish, result)
        if kind == "message_stop":
            return DONE
        if kind == "error":
            raise _event_error(obj)
        return None  # ping, content_block_start/stop, and event types added later

    def completion(self, body: bytes) -> Delta:
        """A non-streamed Messages response (a server that ignored ``stream``)."""
        obj = _json_object(body, "response body")
        if obj.get("type") == "error":
            raise _event_error(obj)
        blocks = obj.get("content")
        if type(blocks) is not list:
            raise ProtocolError("response body has no content list")
        text: list[str] = []
        thinking: list[str] = []
        for block in blocks:
            if type(block) is not dict:
                continue
            if block.get("type") == "text" and type(block.get("text")) is str:
                text.append(block["text"])
            elif block.get("type") == "thinking" and type(block.get("thinking")) is str:
                thinking.append(block["thinking"])
        self.data(orjson.dumps({"type": "message_start", "message": obj}).decode())
        stop = obj.get("stop_reason")
        usage = obj.get("usage")
        prompt, cached = self._prompt_usage
        return Delta(
            "".join(text),
            "".join(thinking),
            _STOP_REASONS.get(stop, stop) if isinstance(stop, str) else "stop",
            Usage(prompt, _count(usage, "output_tokens"), cached_prompt_tokens=cached)
            if type(usage) is dict
            else None,
        )


class AnthropicStream(HTTPStream):
    """One streamed message from an :class:`AnthropicProvider`; behaves as
    :class:`~moa_stream.providers.OpenAIStream` does."""

    __slots__ = ()

    def _parser(self) -> _MessagesParser:
        return _MessagesParser()


_PARAGRAPH = re.compile(r"(?=\n\n)")
#: Content blocks a marked user message is split into at most (the API looks back about 20
#: block boundaries from a breakpoint for an earlier cache entry).
_MAX_BLOCKS = 64


def _mark_cache_prefix(messages: list[dict[str, Any]]) -> None:
    """Mark the last user message with a ``cache_control`` breakpoint, its text split into one
    content block per paragraph (each block but the first starts with the blank line before
    it). A staircase's later step extends that message with new paragraphs (or adds turns after
    it), so the previous step's breakpoint falls on a block boundary of the next request, where
    the API finds the entry it wrote."""
    for message in reversed(messages):
        if message["role"] != "user":
            continue
        parts = [p for p in _PARAGRAPH.split(message["content"]) if p]
        if len(parts) > _MAX_BLOCKS:
            parts = [*parts[: _MAX_BLOCKS - 1], "".join(parts[_MAX_BLOCKS - 1 :])]
        blocks: list[dict[str, Any]] = [{"type": "text", "text": p} for p in parts]
        if blocks:
            blocks[-1]["cache_control"] = {"type": "ephemeral"}
            message["content"] = blocks
        return


def _api_root(base_url: str) -> yarl.URL:
    url = api_root(base_url)
    # Accept the API root as the official SDK takes it, and the same with /v1.
    if url.path.endswith("/v1"):
        url = url.with_path(url.path[: -len("/v1")])
    return url


class AnthropicProvider(PooledHTTPProvider[AnthropicStream]):
    """Anthropic's Messages API, streamed.

    ``base_url`` is the API root as the official SDK takes it (default
    ``https://api.anthropic.com``; a trailing ``/v1`` is accepted); requests go to
    ``{base_url}/v1/messages``. The key is ``api_key`` or read once from the environment
    variable ``api_key_env`` (default ``ANTHROPIC_API_KEY`` when no key is given; a local
    server may need none), sent as ``x-api-key`` and never shown. ``max_tokens`` is sent when
    the request has none (the API requires it). ``version`` is the ``anthropic-version``
    header. ``timeouts``, ``retry``, ``limit``, ``sleep`` and ``rng`` mean what they mean for
    :class:`~moa_stream.providers.OpenAIProvider`.

    Request mapping: system messages are joined into the top-level ``system`` field; other
    messages go as they are, and a trailing assistant message is continued by the model
    (trailing whitespace removed, which the API refuses there); ``stop`` becomes
    ``stop_sequences``; ``extra`` fields (``thinking``, ``top_k``, ``metadata`` ...) are sent as
    given.
    """

    #: A trailing assistant message is continued (the API's assistant prefill); new turns work
    #: too. In the staircase's notation, see :func:`~moa_stream.providers._base.check_continuation`.
    continuation: ClassVar[tuple[str, ...]] = ("prefill:anthropic", "turns")
    _stream_type = AnthropicStream

    def __init__(
        self,
        base_url: str = "https://api.anthropic.com",
        *,
        name: str | None = None,
        api_key: str | None = None,
        api_key_env: str | None = None,
        headers: Mapping[str, str] | None = None,
        max_tokens: int = 4096,
        version: str = "2023-06-01",
        timeouts: Timeouts | None = None,
        retry: RetrySettings | None = None,
        limit: int = 100,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: Callable[[], float] = random.random,
    ) -> None:
        url = _api_root(base_url)
        if max_tokens < 1:
            raise ConfigError("must be at least 1", path="max_tokens")
        api_key = api_key_from(api_key, api_key_env)
        self.max_tokens = max_tokens
        self._setup(
            url,
            name=name,
            stream_url=url / "v1" / "messages",
            models_url=url / "v1" / "models",
            api_key=api_key,
            headers={"anthropic-version": version, **(headers or {})},
            timeouts=timeouts,
            retry=retry,
            limit=limit,
            sleep=sleep,
            rng=rng,
        )

    def _auth_headers(self, api_key: str) -> dict[str, str]:
        """The Messages API takes the key as ``x-api-key``, not as a bearer token."""
        return {"x-api-key": api_key}

    def _encode(self, request: ChatRequest) -> bytes:
        system: list[str] = []
        messages: list[dict[str, Any]] = []
        for message in request.messages:
            role = message.get("role")
            if role in ("system", "developer"):
                system.append(content_text(message.get("content")))
            elif role in ("user", "assistant"):
                messages.append({"role": role, "content": content_text(message.get("content"))})
            else:
                raise RequestRejectedError(
                    f"the Messages API has no role {role!r}", code="invalid_role"
                )
        if messages and messages[-1]["role"] == "assistant":
            messages[-1]["content"] = messages[-1]["content"].rstrip()
            if not messages[-1]["content"]:
                messages.pop()  # an empty prefill continues nothing
        if request.cache_prefix:
            _mark_cache_prefix(messages)
        body: dict[str, Any] = {
            "model": request.model,
            "messages": messages,
            "max_tokens": request.max_tokens or self.max_tokens,
            "stream": True,
        }
        if system:
            body["system"] = "\n\n".join(system)
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.stop:
            body["stop_sequences"] = list(request.stop)
        body.update(request.extra)
        return json_body(body)
