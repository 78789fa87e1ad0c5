"""Pure parsing of OpenAI-compatible stream payloads into :class:`~moa_stream.Delta` values.

Everything here is I/O-free and raises only :class:`~moa_stream.ProviderError` subclasses
without provider context; the stream that calls it adds provider, model and request id.

Quirks handled (see the streaming checklist): ``[DONE]``; chunks whose ``choices`` is empty
(the usage chunk); ``content`` that is ``None`` or ``""``; reasoning as ``reasoning`` or
``reasoning_content``; any finish_reason string, ``""`` read as none; usage in ``usage``, in
``x_groq.usage`` or on the last content chunk; error frames nested (``{"error": {...}}``) or
flat (``{"object": "error", ...}``); content sent as a list of text parts; context-window
overflow in each server's words (:func:`context_length_error`).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from typing import Any, Final

import orjson

from moa_stream._exceptions import ContextLengthError, ProtocolError, ProviderError, UpstreamError
from moa_stream._types import Delta, Usage

__all__ = [
    "DONE",
    "Done",
    "context_length_error",
    "MAX_ERROR_CHARS",
    "error_fields",
    "make_delta",
    "parse_chunk",
    "parse_completion",
    "upstream_error",
]

_loads = orjson.loads
_JSONDecodeError = orjson.JSONDecodeError


class Done(enum.Enum):
    """Type of the :data:`DONE` marker."""

    DONE = "[DONE]"


#: Returned by :func:`parse_chunk` for the ``[DONE]`` sentinel.
DONE: Final = Done.DONE


_DeltaFactory = Callable[[str, str, "str | None", "Usage | None"], Delta]


class _Unfrozen:
    """A :class:`Delta` while it is being built: the same slots, without the frozen
    ``__setattr__``, so that each field is set by the interpreter's own slot store."""

    __slots__ = ("content", "finish_reason", "reasoning", "usage")
    content: str
    reasoning: str
    finish_reason: str | None
    usage: Usage | None


def _build_delta_factory() -> _DeltaFactory:
    # A frozen dataclass sets each field through ``object.__setattr__``. Building the object as
    # an _Unfrozen (the same memory layout) and then making it a Delta builds the same object
    # for a quarter of the constructor's cost, which matters once per chunk. Fall back to the
    # constructor if Delta's fields ever change, or its layout stops matching.
    if set(Delta.__dataclass_fields__) != set(_Unfrozen.__slots__):
        return Delta

    def make(content: str, reasoning: str, finish_reason: str | None, usage: Usage | None) -> Delta:
        delta = _Unfrozen()
        delta.content = content
        delta.reasoning = reasoning
        delta.finish_reason = finish_reason
        delta.usage = usage
        delta.__class__ = Delta  # type: ignore[assignment]
        return delta  # type: ignore[return-value]

    try:
        made = make("c", "r", "f", None)
    except TypeError:  # the layouts differ
        return Delta
    return make if made == Delta("c", "r", "f", None) else Delta


#: ``make_delta(content, reasoning, finish_reason, usage)``: a :class:`Delta`, built fast.
make_delta: Final[_DeltaFactory] = _build_delta_factory()


def _text(value: object, what: str) -> str:
    """Text of a ``content`` or reasoning field that is not a plain string."""
    if value is None:
        return ""
    if type(value) is list:
        # Some servers (Mistral among them) send content as typed parts.
        parts = []
        for part in value:
            if type(part) is dict and type(part.get("text")) is str:
                parts.append(part["text"])
            elif type(part) is not dict:
                raise ProtocolError(f"{what} part is {type(part).__name__}, not an object")
        return "".join(parts)
    raise ProtocolError(f"{what} is {type(value).__name__}, not a string")


def _int(value: object, what: str) -> int:
    if value is None:
        return 0
    if type(value) is int:
        return value
    if type(value) is float and value.is_integer():
        return int(value)
    raise ProtocolError(f"{what} is {type(value).__name__}, not an integer")


def _usage(value: object) -> Usage:
    if type(value) is not dict:
        raise ProtocolError(f"usage is {type(value).__name__}, not an object")
    cached = 0
    details = value.get("prompt_tokens_details")
    if type(details) is dict:
        cached = _int(details.get("cached_tokens"), "usage.prompt_tokens_details.cached_tokens")
    return Usage(
        _int(value.get("prompt_tokens"), "usage.prompt_tokens"),
        _int(value.get("completion_tokens"), "usage.completion_tokens"),
        cached_prompt_tokens=cached,
    )


def _opt_str(value: object) -> str | None:
    if value is None or type(value) is str:
        return value
    if type(value) is int:
        return str(value)
    return None


#: The longest error message taken from an upstream's body; longer ones are cut (after masking).
MAX_ERROR_CHARS = 500


def error_fields(obj: object) -> tuple[str, str | None, str | None] | None:
    """``(message, code, type)`` of an OpenAI error object, nested or flat; else ``None``.

    Accepts ``{"error": {"message", "type", "code"}}``, ``{"error": "text"}``, the flat
    ``{"object": "error", "message", "type", "code"}`` of older vLLM, and ``{"detail": ...}``
    of FastAPI-based servers. ``code`` is returned as text even when sent as a number.
    """
    if type(obj) is not dict:
        return None
    err = obj.get("error")
    if err is not None:
        if type(err) is dict:
            message = err.get("message")
            return (
                message if type(message) is str and message else "upstream error",
                _opt_str(err.get("code")),
                _opt_str(err.get("type")),
            )
        return (str(err) or "upstream error", None, None)
    if obj.get("object") == "error":
        message = obj.get("message")
        return (
            message if type(message) is str and message else "upstream error",
            _opt_str(obj.get("code")),
            _opt_str(obj.get("type")),
        )
    detail = obj.get("detail")
    if detail is not None:
        return (detail if type(detail) is str else orjson.dumps(detail).decode(), None, None)
    return None


#: Codes and types that mean "the prompt does not fit": OpenAI's and llama-server's.
_OVERFLOW_CODES: Final = frozenset({"context_length_exceeded", "exceed_context_size_error"})
#: The same in words: OpenAI and vLLM ("maximum context length is 4096 tokens"),
#: llama-cpp-python ("Requested tokens (1717) exceed context window of 256"), llama-server
#: ("the request exceeds the available context size"), Anthropic ("prompt is too long").
_OVERFLOW_WORDS: Final = re.compile(
    r"maximum context length|context[ _]length[ _]exceeded|exceeds? (?:the )?(?:available )?"
    r"context (?:window|size)|prompt is too long",
    re.IGNORECASE,
)
_WINDOW_NUMBERS: Final = (
    # (regex, group of the prompt's size or 0, group of the window or 0)
    (re.compile(r"Requested tokens \((\d+)\) exceed context window of (\d+)"), 1, 2),
    (re.compile(r"maximum context length is (\d+)"), 0, 1),
    (re.compile(r"(\d+) tokens > (\d+) maximum"), 1, 2),
)
_PROMPT_NUMBERS: Final = re.compile(
    r"(?:resulted in|request has|you requested) (\d+) (?:input )?tokens"
)


def _count(value: object) -> int | None:
    return value if type(value) is int and value >= 0 else None


def context_length_error(
    message: str, code: str | None, error_type: str | None, body: object = None
) -> ContextLengthError | None:
    """A :class:`ContextLengthError` if an error's fields say the prompt overflowed the
    model's context window, else ``None``.

    ``body`` is the parsed error body, for llama-server's ``n_prompt_tokens`` and ``n_ctx``;
    figures given only in the message are read from it.
    """
    if (
        code not in _OVERFLOW_CODES
        and error_type not in _OVERFLOW_CODES
        and not _OVERFLOW_WORDS.search(message)
    ):
        return None
    prompt: int | None = None
    window: int | None = None
    err = body.get("error") if type(body) is dict else None
    if type(err) is dict:
        prompt = _count(err.get("n_prompt_tokens"))
        window = _count(err.get("n_ctx"))
    if window is None:
        for pattern, prompt_group, window_group in _WINDOW_NUMBERS:
            match = pattern.search(message)
            if match is not None:
                window = int(match.group(window_group))
                if prompt_group and prompt is None:
                    prompt = int(match.group(prompt_group))
                break
    if prompt is None:
        match = _PROMPT_NUMBERS.search(message)
        if match is not None:
            prompt = int(match.group(1))
    return ContextLengthError(
        message,
        code=code,
        error_type=error_type,
        prompt_tokens=prompt,
        context_window=window,
    )


def upstream_error(data: str) -> ProviderError:
    """The error for an error frame received inside a 200 stream (``data`` as sent):
    :class:`UpstreamError`, or :class:`ContextLengthError` when it says the prompt overflowed.

    The message is not cut here: the stream masks the endpoint's key in it first and then cuts
    it to :data:`MAX_ERROR_CHARS`, so that a key straddling the cut cannot leave a piece behind.
    """
    try:
        obj = _loads(data)
    except _JSONDecodeError:
        return UpstreamError(data.strip() or "upstream error")
    fields = error_fields(obj)
    if fields is None:
        return UpstreamError(data.strip() or "upstream error")
    message, code, error_type = fields
    overflow = context_length_error(message, code, error_type, obj)
    if overflow is not None:
        return overflow
    return UpstreamError(message, code=code, error_type=error_type)


def parse_chunk(data: str) -> Delta | Done | None:
    """Parse one SSE ``data`` payload of a chat-completions stream.

    Returns a :class:`Delta`, :data:`DONE` for the end sentinel, or ``None`` for a chunk that
    carries nothing for the caller (the role-only first chunk, an empty keep-alive object).
    Only the choice with index 0 is read. Raises :class:`UpstreamError` for an error frame and
    :class:`ProtocolError` for invalid JSON or fields of the wrong type.
    """
    if data == "[DONE]":
        # Every stream ends so: tested before parsing, because orjson's error for it builds a
        # json.JSONDecodeError (a Python constructor that counts lines) to be thrown away.
        return DONE
    try:
        obj = _loads(data)
    except _JSONDecodeError as exc:
        if data.strip() == "[DONE]":
            return DONE
        raise ProtocolError(f"invalid JSON in stream chunk: {exc}") from exc
    # The fast path: a plain content chunk, the shape of almost every chunk of a stream.
    # Subscripts cost less than ``.get`` calls; anything unusual (a missing key, another type,
    # a second delta field, a finish, usage, an error) falls through to the full parser.
    try:
        choice = obj["choices"][0]
        delta = choice["delta"]
        content = delta["content"]
        if (
            type(content) is str
            and len(delta) == 1
            and choice["finish_reason"] is None
            and choice["index"] == 0
            and obj.get("usage") is None
            and "error" not in obj
            and "x_groq" not in obj
        ):
            return make_delta(content, "", None, None) if content else None
    except (KeyError, IndexError, TypeError):
        pass
    return _parse_object(obj, data)


def _parse_object(obj: Any, data: str) -> Delta | None:
    if type(obj) is not dict:
        raise ProtocolError(f"stream chunk is {type(obj).__name__}, not an object")
    # Checked on every chunk: OpenRouter's mid-stream error frames also carry choices.
    if obj.get("error") is not None:
        raise upstream_error(data)

    choices = obj.get("choices")
    content: Any = None
    reasoning: Any = None
    finish: Any = None
    if choices:
        if type(choices) is not list:
            raise ProtocolError(f"choices is {type(choices).__name__}, not a list")
        choice = _first_choice(choices)
        if choice is not None:
            delta = choice.get("delta")
            if delta is not None:
                if type(delta) is not dict:
                    raise ProtocolError(f"delta is {type(delta).__name__}, not an object")
                content = delta.get("content")
                if content is not None and type(content) is not str:
                    content = _text(content, "content")
                reasoning = delta.get("reasoning")
                if reasoning is None:
                    reasoning = delta.get("reasoning_content")
                if reasoning is not None and type(reasoning) is not str:
                    reasoning = _text(reasoning, "reasoning")
            finish = choice.get("finish_reason")
            if finish is not None and type(finish) is not str:
                raise ProtocolError(f"finish_reason is {type(finish).__name__}, not a string")
    elif choices is not None and type(choices) is not list:
        raise ProtocolError(f"choices is {type(choices).__name__}, not a list")
    elif obj.get("object") == "error":
        raise upstream_error(data)

    usage: Any = obj.get("usage")
    if usage is None:
        groq = obj.get("x_groq")
        if type(groq) is dict:
            usage = groq.get("usage")
    if usage is not None:
        usage = _usage(usage)
    if content or reasoning or finish or usage is not None:
        return make_delta(content or "", reasoning or "", finish or None, usage)
    return None


def _first_choice(choices: list[Any]) -> dict[str, Any] | None:
    for choice in choices:
        if type(choice) is not dict:
            raise ProtocolError(f"choice is {type(choice).__name__}, not an object")
        if choice.get("index", 0) == 0:
            return choice
    return None


def parse_completion(body: bytes) -> Delta:
    """Parse a non-streamed ``chat.completion`` body, for servers that ignore ``stream``.

    The whole answer becomes one :class:`Delta`.
    """
    try:
        obj = _loads(body)
    except _JSONDecodeError as exc:
        raise ProtocolError(f"invalid JSON in response body: {exc}") from exc
    fields = error_fields(obj)
    if fields is not None:
        text, code, error_type = fields
        overflow = context_length_error(text, code, error_type, obj)
        if overflow is not None:
            raise overflow
        raise UpstreamError(text, code=code, error_type=error_type)
    if type(obj) is not dict:
        raise ProtocolError(f"response body is {type(obj).__name__}, not an object")
    choices = obj.get("choices")
    if type(choices) is not list or not choices:
        raise ProtocolError("response body has no choices")
    choice = _first_choice(choices)
    if choice is None:
        raise ProtocolError("response body has no choice with index 0")
    message = choice.get("message")
    if type(message) is not dict:
        raise ProtocolError("choice has no message object")
    content = message.get("content")
    if type(content) is not str:
        content = _text(content, "content")
    reasoning = message.get("reasoning")
    if reasoning is None:
        reasoning = message.get("reasoning_content")
    if type(reasoning) is not str:
        reasoning = _text(reasoning, "reasoning")
    finish = choice.get("finish_reason")
    if finish is not None and type(finish) is not str:
        raise ProtocolError(f"finish_reason is {type(finish).__name__}, not a string")
    usage = obj.get("usage")
    return Delta(
        content,
        reasoning,
        finish or "stop",
        _usage(usage) if usage is not None else None,
    )
