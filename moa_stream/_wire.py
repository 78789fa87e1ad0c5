"""The OpenAI chat-completions wire format, in one place for every part that speaks it.

The client (:mod:`moa_stream.providers`), the server (:mod:`moa_stream.server`), the simulator
(:mod:`moa_stream.sim`) and the reference MoA of the bench all read and write the same bytes,
so they share this module: request bodies and their checking, streamed chunks, completion
objects, usage objects, error bodies and ``Retry-After``. Parsing a *response* stream is the
providers' business (``providers/_chunks.py``): it must accept every dialect upstream servers
send, where this module writes one canonical form.

Pure: no I/O and no aiohttp, so a client-only program pays for none of the server.

:class:`ChunkEncoder` writes a stream's chunks. A chunk's ``id``, ``created`` and ``model``
never change within a stream, so the bytes around a token are built once per stream and a
content chunk costs one ``orjson.dumps`` of the token and two concatenations.
"""

from __future__ import annotations

import email.utils
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypedDict

import orjson

from moa_stream._types import ChatMessage, ChatRequest, sampling_fields

__all__ = [
    "DONE",
    "KEEPALIVE",
    "ROLES",
    "ChatCompletionRequest",
    "ChunkEncoder",
    "WireError",
    "WireErrorFields",
    "chat_request_body",
    "completion_object",
    "error_body",
    "model_objects",
    "parse_chat_request",
    "parse_retry_after",
    "retry_after_headers",
    "usage_object",
]

#: The end-of-stream sentinel.
DONE = b"data: [DONE]\n\n"
#: An SSE comment: every client skips it; it keeps proxies and idle timers from closing.
KEEPALIVE = b": keep-alive\n\n"

#: Message roles a request may use. ``developer`` is OpenAI's newer name for ``system``.
ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


# -- errors ------------------------------------------------------------------------------------


def error_body(
    message: str, error_type: str, code: str | None = None, param: str | None = None
) -> bytes:
    """An OpenAI error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return orjson.dumps(
        {"error": {"message": message, "type": error_type, "param": param, "code": code}}
    )


class WireErrorFields(TypedDict, total=False):
    """The keyword arguments of :class:`WireError`, for subclasses that pass them on."""

    error_type: str
    param: str | None
    code: str | None
    headers: Mapping[str, str] | None


class WireError(Exception):
    """A request refused with an OpenAI error: HTTP ``status`` plus the error object's fields.

    ``headers`` go on the response (``Retry-After``, ``Allow`` ...).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        error_type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def payload(self) -> dict[str, Any]:
        """The ``{"error": {...}}`` object."""
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }

    def body(self) -> bytes:
        """The JSON body of the error response."""
        return error_body(self.message, self.error_type, self.code, self.param)

    def frame(self) -> bytes:
        """The error as an SSE event, for a stream whose 200 status has already gone out."""
        return b"data: " + self.body() + b"\n\n"


def retry_after_headers(seconds: float) -> dict[str, str]:
    """``Retry-After`` (whole seconds, rounded up, as HTTP wants) and OpenAI's finer
    ``retry-after-ms``, which :func:`parse_retry_after` prefers."""
    seconds = max(0.0, seconds)
    return {"Retry-After": str(math.ceil(seconds)), "retry-after-ms": str(round(seconds * 1000))}


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds from ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date); ``None``
    when neither is there or usable. ``headers`` must look names up case-insensitively."""
    value = headers.get("retry-after-ms")
    if value:
        try:
            ms = float(value)
        except ValueError:
            pass
        else:
            if ms >= 0 and math.isfinite(ms):
                return ms / 1000.0
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            return None
        return max(0.0, when.timestamp() - time.time())
    return seconds if seconds >= 0 and math.isfinite(seconds) else None


# -- requests ----------------------------------------------------------------------------------


def chat_request_body(
    request: ChatRequest,
    *,
    stream: bool,
    max_tokens_field: str = "max_tokens",
    include_usage: bool = False,
) -> dict[str, Any]:
    """The JSON body for ``request``: what a client sends. ``request.extra`` goes last, so a
    caller's own fields win over the defaults."""
    messages = request.messages
    body: dict[str, Any] = {
        "model": request.model,
        "messages": messages if isinstance(messages, list | tuple) else list(messages),
        "stream": stream,
    }
    body.update(sampling_fields(request, max_tokens=max_tokens_field))
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    body.update(request.extra)
    return body


@dataclass(frozen=True, slots=True)
class ChatCompletionRequest:
    """The fields of a request body that a server acts on, checked.

    ``body`` is the whole decoded object, for a server's own extension fields
    (``moa_stream`` for this project's server, ``sim`` for the simulator); everything else in
    it is ignored, as OpenAI-compatible servers do.
    """

    model: str
    messages: tuple[ChatMessage, ...]
    stream: bool = False
    include_usage: bool = False
    temperature: float | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] | None = None
    seed: int | None = None
    body: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)


def type_name(value: object) -> str:
    """How an error message names a JSON value's type."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__  # pragma: no cover - JSON has no other types


def bad_request(message: str, param: str | None = None, code: str | None = None) -> WireError:
    """400 naming the ``param`` at fault."""
    return WireError(400, message, param=param, code=code)


def wrong_type(param: str, expected: str, value: object) -> WireError:
    """400 ``invalid_type``: ``param`` should be ``expected``."""
    return bad_request(
        f"Invalid type for '{param}': expected {expected}, got {type_name(value)}.",
        param,
        "invalid_type",
    )


def invalid_value(param: str, message: str) -> WireError:
    """400 ``invalid_value``: ``param`` has the right type and a value out of range."""
    return bad_request(f"Invalid value for '{param}': {message}", param, "invalid_value")


def _missing(param: str) -> WireError:
    message = f"Missing required parameter: '{param}'."
    return bad_request(message, param, "missing_required_parameter")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def optional_bool(table: Mapping[str, Any], key: str, param: str | None = None) -> bool:
    """``table[key]`` as a boolean (absent or null: False); 400 if it is something else."""
    value = table.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise wrong_type(param or key, "a boolean", value)
    return value


def extension(body: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    """A server's own object field of the body (``moa_stream``, ``sim``); empty if absent."""
    value = body.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise wrong_type(name, "an object", value)
    return value


def _content(value: object, param: str, role: str) -> str:
    if isinstance(value, str):
        return value
    if value is None and role == "assistant":
        # An assistant turn that only called tools has null content; it adds no text.
        return ""
    if not isinstance(value, list):
        raise wrong_type(param, "a string or an array of content parts", value)
    texts = []
    for j, part in enumerate(value):
        where = f"{param}[{j}]"
        if not isinstance(part, dict):
            raise wrong_type(where, "an object", part)
        kind = part.get("type")
        if kind != "text":
            # Images, audio and files would be silently lost on the way to the agents.
            raise bad_request(
                f"Invalid value for '{where}.type': only 'text' content parts are supported, "
                f"got {kind!r}.",
                f"{where}.type",
                "unsupported_content_type",
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise wrong_type(f"{where}.text", "a string", text)
        texts.append(text)
    return "\n".join(texts)


def _messages(value: object) -> tuple[ChatMessage, ...]:
    if value is None:
        raise _missing("messages")
    if not isinstance(value, list):
        raise wrong_type("messages", "an array", value)
    if not value:
        raise bad_request(
            "Invalid value for 'messages': must contain at least one message.",
            "messages",
            "empty_array",
        )
    out: list[ChatMessage] = []
    for i, item in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(item, dict):
            raise wrong_type(where, "an object", item)
        role = item.get("role")
        if role is None:
            raise _missing(f"{where}.role")
        if not isinstance(role, str):
            raise wrong_type(f"{where}.role", "a string", role)
        if role not in ROLES:
            raise invalid_value(
                f"{where}.role", f"must be one of {', '.join(sorted(ROLES))}; got {role!r}."
            )
        if "content" not in item and role != "assistant":
            raise _missing(f"{where}.content")
        message: ChatMessage = {
            "role": role,
            "content": _content(item.get("content"), f"{where}.content", role),
        }
        name = item.get("name")
        if name is not None:
            if not isinstance(name, str):
                raise wrong_type(f"{where}.name", "a string", name)
            message["name"] = name
        out.append(message)
    return tuple(out)


def _max_tokens(body: Mapping[str, Any]) -> int | None:
    # max_completion_tokens is the current name; max_tokens the deprecated one. Prefer the new.
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if value is None:
            continue
        if not _is_int(value):
            raise wrong_type(key, "an integer", value)
        if value < 1:
            raise invalid_value(key, "must be at least 1.")
        return int(value)
    return None


def _stop(value: object) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return (value,) if value else None
    if not isinstance(value, list):
        raise wrong_type("stop", "a string or an array of strings", value)
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise wrong_type(f"stop[{i}]", "a string", item)
    return tuple(s for s in value if s) or None


def parse_chat_request(raw: bytes) -> ChatCompletionRequest:
    """Parse and check a ``POST /v1/chat/completions`` body; every problem is a
    :class:`WireError` (400) whose ``param`` names the field, as OpenAI's API does."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise bad_request(
            "We could not parse the JSON body of your request. Send valid JSON.",
            code="invalid_json",
        ) from None
    if not isinstance(body, dict):
        raise bad_request(
            f"The request body must be a JSON object, got {type_name(body)}.", code="invalid_type"
        )

    model = body.get("model")
    if model is None:
        raise _missing("model")
    if not isinstance(model, str):
        raise wrong_type("model", "a string", model)

    messages = _messages(body.get("messages"))
    stream = optional_bool(body, "stream")
    include_usage = optional_bool(
        extension(body, "stream_options"), "include_usage", "stream_options.include_usage"
    )

    temperature = body.get("temperature")
    if temperature is not None:
        if not _is_number(temperature):
            raise wrong_type("temperature", "a number", temperature)
        if not 0 <= temperature <= 2:
            raise invalid_value("temperature", "must be between 0 and 2.")
        temperature = float(temperature)

    n = body.get("n")
    if n is not None:
        if not _is_int(n):
            raise wrong_type("n", "an integer", n)
        if n != 1:
            # One answer per request: n > 1 would have to run the whole MoA n times.
            raise invalid_value("n", "only n = 1 is supported.")

    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise wrong_type("seed", "an integer", seed)

    return ChatCompletionRequest(
        model=model,
        messages=messages,
        stream=stream,
        include_usage=include_usage and stream,
        temperature=temperature,
        max_tokens=_max_tokens(body),
        stop=_stop(body.get("stop")),
        seed=seed,
        body=body,
    )


# -- responses ---------------------------------------------------------------------------------


def usage_object(
    prompt_tokens: int,
    completion_tokens: int,
    *,
    estimated: bool | None = None,
    cached_tokens: int | None = None,
) -> dict[str, Any]:
    """OpenAI's usage object; ``estimated`` (when given) says the figures are counted by this
    project rather than reported by the upstream; ``cached_tokens`` (when given) is the part of
    the prompt read from a prefix cache, as ``prompt_tokens_details.cached_tokens``."""
    obj: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if cached_tokens is not None:
        obj["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    if estimated is not None:
        obj["estimated"] = estimated
    return obj


def _fields(extra: Mapping[str, Any] | None) -> bytes:
    # Top-level extension fields appended to a chunk object: b',"a":1,"b":2' or nothing.
    if not extra:
        return b""
    return b"," + orjson.dumps(extra)[1:-1]


class ChunkEncoder:
    """The SSE events of one streamed completion, as bytes ready to write.

    Every chunk has the same ``id``, ``created`` and ``model``; with ``include_usage`` every
    chunk has ``"usage": null`` and :meth:`usage` writes the final ``choices: []`` chunk.
    ``extra`` arguments add top-level fields to one chunk (a server's extension, e.g. the
    simulator's ``x_sim`` timings).
    """

    __slots__ = (
        "_content_prefix",
        "_content_suffix",
        "_head",
        "_reasoning_prefix",
        "_usage_null",
    )

    def __init__(self, completion_id: str, created: int, model: str, include_usage: bool) -> None:
        self._head = b"".join(
            (
                b'data: {"id":',
                orjson.dumps(completion_id),
                b',"object":"chat.completion.chunk","created":',
                str(created).encode(),
                b',"model":',
                orjson.dumps(model),
                b',"system_fingerprint":null,"choices":[',
            )
        )
        self._usage_null = b',"usage":null' if include_usage else b""
        self._content_prefix = self._head + b'{"index":0,"delta":{"content":'
        self._reasoning_prefix = self._head + b'{"index":0,"delta":{"reasoning_content":'
        self._content_suffix = (
            b'},"logprobs":null,"finish_reason":null}]' + self._usage_null + b"}\n\n"
        )

    def role(self) -> bytes:
        """The first chunk: ``role: "assistant"`` (only here) and empty content."""
        return (
            self._head
            + b'{"index":0,"delta":{"role":"assistant","content":""},'
            + b'"logprobs":null,"finish_reason":null}]'
            + self._usage_null
            + b"}\n\n"
        )

    def content(self, text: str) -> bytes:
        """A content chunk carrying ``text``."""
        return self._content_prefix + orjson.dumps(text) + self._content_suffix

    def content_with_extra(self, text: str, extra: Mapping[str, Any]) -> bytes:
        """A content chunk with top-level extension fields."""
        return (
            self._content_prefix
            + orjson.dumps(text)
            + b'},"logprobs":null,"finish_reason":null}]'
            + self._usage_null
            + _fields(extra)
            + b"}\n\n"
        )

    def reasoning(self, text: str) -> bytes:
        """A ``reasoning_content`` chunk: the field DeepSeek, vLLM and llama.cpp use for a
        model's thinking, which chat UIs show apart from the answer."""
        return self._reasoning_prefix + orjson.dumps(text) + self._content_suffix

    def finish(self, finish_reason: str, extra: Mapping[str, Any] | None = None) -> bytes:
        """The chunk that ends the choice: an empty delta and the ``finish_reason``."""
        return (
            self._head
            + b'{"index":0,"delta":{},"logprobs":null,"finish_reason":'
            + orjson.dumps(finish_reason)
            + b"}]"
            + self._usage_null
            + _fields(extra)
            + b"}\n\n"
        )

    def usage(
        self,
        prompt_tokens: int,
        completion_tokens: int,
        extra: Mapping[str, Any] | None = None,
        *,
        cached_tokens: int | None = None,
    ) -> bytes:
        """The ``stream_options.include_usage`` chunk: no choices, the usage."""
        usage = usage_object(prompt_tokens, completion_tokens, cached_tokens=cached_tokens)
        return self._head + b'],"usage":' + orjson.dumps(usage) + _fields(extra) + b"}\n\n"

    def malformed(self) -> bytes:
        """A content chunk cut off inside its JSON, for fault injection: invalid JSON."""
        return self._content_prefix + b'"unterminated\n\n'


def model_objects(
    ids: Iterable[str], descriptions: Mapping[str, str] | None = None
) -> dict[str, dict[str, Any]]:
    """The ``model`` objects of ``/v1/models``, by id: one per MoA a server answers for, all
    created now and owned by ``moa-stream``, described when ``descriptions`` has the id."""
    created = int(time.time())
    descriptions = descriptions or {}
    return {
        model_id: {
            "id": model_id,
            "object": "model",
            "created": created,
            "owned_by": "moa-stream",
            "description": descriptions.get(model_id, ""),
        }
        for model_id in ids
    }


def completion_object(
    *,
    completion_id: str,
    created: int,
    model: str,
    text: str,
    finish_reason: str,
    prompt_tokens: int,
    completion_tokens: int,
    extra: Mapping[str, Any] | None = None,
    cached_tokens: int | None = None,
) -> dict[str, Any]:
    """A non-streamed ``chat.completion`` object. ``extra`` adds top-level fields;
    ``cached_tokens`` see :func:`usage_object`."""
    obj: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage_object(prompt_tokens, completion_tokens, cached_tokens=cached_tokens),
    }
    if extra:
        obj.update(extra)
    return obj
