"""The OpenAI chat-completions wire format, both ways: requests in, chunks and objects out.

:func:`parse_chat_request` checks a body and turns it into a :class:`ChatCompletionRequest`;
every problem is an :class:`~moa_stream.server.errors.APIError` (400) naming the ``param``.

:class:`ChunkEncoder` writes a stream's chunks. A chunk's ``id``, ``created`` and ``model``
never change within a stream, so the bytes around a token are built once per request and a
content chunk costs one ``orjson.dumps`` of the token and two concatenations.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from moa_stream._types import ChatMessage, Usage
from moa_stream.server.errors import APIError

__all__ = [
    "DONE",
    "PROGRESS_TEXT",
    "ROLES",
    "ChatCompletionRequest",
    "ChunkEncoder",
    "completion_object",
    "parse_chat_request",
    "truthy_header",
    "usage_object",
]

DONE = b"data: [DONE]\n\n"

#: Message roles a request may use. ``developer`` is OpenAI's newer name for ``system``.
ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


@dataclass(frozen=True, slots=True)
class ChatCompletionRequest:
    """The fields of a request the server acts on; everything else in the body is ignored.

    ``temperature``, ``max_tokens`` and ``stop`` apply to the MoA's aggregator. ``progress``
    asks for the MoA's progress inside the stream (see ``docs/server.md``); ``progress_text``
    for the proposers' text in it too (the ``text`` level).
    """

    model: str
    messages: tuple[ChatMessage, ...]
    stream: bool = False
    include_usage: bool = False
    temperature: float | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] | None = None
    progress: bool = False
    progress_text: bool = False


#: The progress level that also forwards the proposers' text: ``X-MoA-Progress: text`` or
#: ``"moa_stream": {"progress": "text"}``.
PROGRESS_TEXT = "text"


def truthy_header(value: str | None) -> bool:
    """Whether a flag header (``X-MoA-Progress``) is set: ``1``, ``true``, ``yes`` or ``on``."""
    return value is not None and value.strip().lower() in ("1", "true", "yes", "on")


def _type_name(value: object) -> str:
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


def _wrong_type(param: str, expected: str, value: object) -> APIError:
    return APIError.bad_request(
        f"Invalid type for '{param}': expected {expected}, got {_type_name(value)}.",
        param,
        "invalid_type",
    )


def _invalid_value(param: str, message: str) -> APIError:
    return APIError.bad_request(f"Invalid value for '{param}': {message}", param, "invalid_value")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _content(value: object, param: str, role: str) -> str:
    if isinstance(value, str):
        return value
    if value is None and role == "assistant":
        # An assistant turn that only called tools has null content; it adds no text.
        return ""
    if not isinstance(value, list):
        raise _wrong_type(param, "a string or an array of content parts", value)
    texts = []
    for j, part in enumerate(value):
        where = f"{param}[{j}]"
        if not isinstance(part, dict):
            raise _wrong_type(where, "an object", part)
        kind = part.get("type")
        if kind != "text":
            # Images, audio and files would be silently lost on the way to the agents.
            raise APIError.bad_request(
                f"Invalid value for '{where}.type': only 'text' content parts are supported, "
                f"got {kind!r}.",
                f"{where}.type",
                "unsupported_content_type",
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise _wrong_type(f"{where}.text", "a string", text)
        texts.append(text)
    return "\n".join(texts)


def _messages(value: object) -> tuple[ChatMessage, ...]:
    if value is None:
        raise APIError.bad_request("Missing required parameter: 'messages'.", "messages", "missing")
    if not isinstance(value, list):
        raise _wrong_type("messages", "an array", value)
    if not value:
        raise _invalid_value("messages", "must contain at least one message.")
    out: list[ChatMessage] = []
    for i, item in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(item, dict):
            raise _wrong_type(where, "an object", item)
        role = item.get("role")
        if role is None:
            raise APIError.bad_request(
                f"Missing required parameter: '{where}.role'.", f"{where}.role", "missing"
            )
        if not isinstance(role, str):
            raise _wrong_type(f"{where}.role", "a string", role)
        if role not in ROLES:
            raise _invalid_value(
                f"{where}.role", f"must be one of {', '.join(sorted(ROLES))}; got {role!r}."
            )
        if "content" not in item and role != "assistant":
            raise APIError.bad_request(
                f"Missing required parameter: '{where}.content'.", f"{where}.content", "missing"
            )
        message: ChatMessage = {
            "role": role,
            "content": _content(item.get("content"), f"{where}.content", role),
        }
        name = item.get("name")
        if name is not None:
            if not isinstance(name, str):
                raise _wrong_type(f"{where}.name", "a string", name)
            message["name"] = name
        out.append(message)
    return tuple(out)


def _optional_bool(body: Mapping[str, Any], key: str, param: str | None = None) -> bool:
    value = body.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _wrong_type(param or key, "a boolean", value)
    return value


def _max_tokens(body: Mapping[str, Any]) -> int | None:
    # max_completion_tokens is the current name; max_tokens the deprecated one. Prefer the new.
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if value is None:
            continue
        if not _is_int(value):
            raise _wrong_type(key, "an integer", value)
        if value < 1:
            raise _invalid_value(key, "must be at least 1.")
        return int(value)
    return None


def _stop(value: object) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return (value,) if value else None
    if not isinstance(value, list):
        raise _wrong_type("stop", "a string or an array of strings", value)
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise _wrong_type(f"stop[{i}]", "a string", item)
    return tuple(s for s in value if s) or None


def parse_chat_request(
    raw: bytes, *, progress_header: bool | str | None = False
) -> ChatCompletionRequest:
    """Parse and check a ``POST /v1/chat/completions`` body.

    Unknown fields are accepted and ignored, as OpenAI-compatible servers do. ``progress`` is
    on when ``progress_header`` is (a flag, or the ``X-MoA-Progress`` header's value: ``1``,
    ``text``...) or the body has ``"moa_stream": {"progress": true}``; ``progress_text`` when
    either says ``"text"``.
    """
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise APIError.bad_request(
            "We could not parse the JSON body of your request. Send valid JSON.",
            code="invalid_json",
        ) from None
    if not isinstance(body, dict):
        raise APIError.bad_request(
            f"The request body must be a JSON object, got {_type_name(body)}.", code="invalid_type"
        )

    model = body.get("model")
    if model is None:
        raise APIError.bad_request("Missing required parameter: 'model'.", "model", "missing")
    if not isinstance(model, str):
        raise _wrong_type("model", "a string", model)

    messages = _messages(body.get("messages"))
    stream = _optional_bool(body, "stream")

    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise _wrong_type("stream_options", "an object", options)
        include_usage = _optional_bool(options, "include_usage", "stream_options.include_usage")

    temperature = body.get("temperature")
    if temperature is not None:
        if not _is_number(temperature):
            raise _wrong_type("temperature", "a number", temperature)
        if not 0 <= temperature <= 2:
            raise _invalid_value("temperature", "must be between 0 and 2.")
        temperature = float(temperature)

    n = body.get("n")
    if n is not None:
        if not _is_int(n):
            raise _wrong_type("n", "an integer", n)
        if n != 1:
            # A MoA produces one answer; n > 1 would have to run the whole MoA n times.
            raise _invalid_value("n", "only n = 1 is supported.")

    if isinstance(progress_header, str):
        progress_text = progress_header.strip().lower() == PROGRESS_TEXT
        progress = progress_text or truthy_header(progress_header)
    else:
        progress, progress_text = bool(progress_header), False
    ours = body.get("moa_stream")
    if ours is not None:
        if not isinstance(ours, dict):
            raise _wrong_type("moa_stream", "an object", ours)
        level = ours.get("progress")
        if level == PROGRESS_TEXT:
            progress = progress_text = True
        elif isinstance(level, str):
            raise _wrong_type("moa_stream.progress", 'a boolean or "text"', level)
        else:
            progress = _optional_bool(ours, "progress", "moa_stream.progress") or progress

    return ChatCompletionRequest(
        model=model,
        messages=messages,
        stream=stream,
        include_usage=include_usage and stream,
        temperature=temperature,
        max_tokens=_max_tokens(body),
        stop=_stop(body.get("stop")),
        progress=progress,
        progress_text=progress_text,
    )


def usage_object(usage: Usage) -> dict[str, int]:
    """OpenAI's usage object. The figures add up every request of the run (proposers too)."""
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


class ChunkEncoder:
    """The SSE events of one streamed completion, as bytes ready to write.

    Every chunk has the same ``id``, ``created`` and ``model``; with ``include_usage`` every
    chunk has ``"usage": null`` and :meth:`usage` writes the final ``choices: []`` chunk.
    """

    __slots__ = ("_content_prefix", "_content_suffix", "_head", "_tail")

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
        self._tail = (b',"usage":null' if include_usage else b"") + b"}\n\n"
        self._content_prefix = self._head + b'{"index":0,"delta":{"content":'
        self._content_suffix = b'},"logprobs":null,"finish_reason":null}]' + self._tail

    def role(self) -> bytes:
        """The first chunk: ``role: "assistant"`` (only here) and empty content."""
        return (
            self._head
            + b'{"index":0,"delta":{"role":"assistant","content":""},'
            + b'"logprobs":null,"finish_reason":null}]'
            + self._tail
        )

    def content(self, text: str) -> bytes:
        """A content chunk carrying ``text``."""
        return self._content_prefix + orjson.dumps(text) + self._content_suffix

    def finish(self, finish_reason: str) -> bytes:
        """The chunk that ends the choice: an empty delta and the ``finish_reason``."""
        return (
            self._head
            + b'{"index":0,"delta":{},"logprobs":null,"finish_reason":'
            + orjson.dumps(finish_reason)
            + b"}]"
            + self._tail
        )

    def usage(self, usage: Usage) -> bytes:
        """The ``stream_options.include_usage`` chunk: no choices, the run's usage."""
        return self._head + b'],"usage":' + orjson.dumps(usage_object(usage)) + b"}\n\n"


def completion_object(
    *,
    completion_id: str,
    created: int,
    model: str,
    text: str,
    finish_reason: str,
    usage: Usage,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A non-streamed ``chat.completion`` object. ``extra`` adds top-level fields."""
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
        "usage": usage_object(usage),
    }
    if extra:
        obj.update(extra)
    return obj
