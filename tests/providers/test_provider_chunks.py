"""Parsing stream payloads: one test per quirk of the OpenAI-compatible servers in the wild."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from moa_stream import Delta, ProtocolError, UpstreamError, Usage
from moa_stream.providers._chunks import (
    DONE,
    make_delta,
    parse_chunk,
    parse_completion,
)
from moa_stream.providers._errors import status_error


def chunk(delta: dict[str, Any] | None = None, finish: Any = None, **top: Any) -> str:
    choice: dict[str, Any] = {"index": 0, "delta": delta or {}, "finish_reason": finish}
    return orjson.dumps(
        {"id": "c", "object": "chat.completion.chunk", "choices": [choice], **top}
    ).decode()


def raw(obj: Any) -> str:
    return orjson.dumps(obj).decode()


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(chunk({"content": "hi"}), Delta("hi"), id="content"),
        pytest.param(chunk({"role": "assistant", "content": ""}), None, id="role-only-empty"),
        pytest.param(chunk({"role": "assistant", "content": None}), None, id="role-only-null"),
        pytest.param(chunk({"role": "assistant"}), None, id="role-only-no-content"),
        pytest.param(chunk({"role": "assistant", "content": "Hi"}), Delta("Hi"), id="role+content"),
        pytest.param(chunk({"content": None}), None, id="null-content"),
        pytest.param(chunk({"content": ""}), None, id="empty-content"),
        pytest.param(chunk({}), None, id="empty-delta"),
        pytest.param("[DONE]", DONE, id="done"),
        pytest.param(" [DONE] ", DONE, id="done-with-spaces"),
        pytest.param(chunk({"reasoning": "hmm"}), Delta(reasoning="hmm"), id="reasoning"),
        pytest.param(
            chunk({"reasoning_content": "hmm"}), Delta(reasoning="hmm"), id="reasoning-content"
        ),
        pytest.param(
            chunk({"reasoning": "a", "reasoning_content": "a"}),
            Delta(reasoning="a"),
            id="both-reasoning-fields-not-doubled",
        ),
        pytest.param(
            chunk({"content": None, "reasoning_content": "r"}), Delta(reasoning="r"), id="r-only"
        ),
        pytest.param(chunk({}, "stop"), Delta(finish_reason="stop"), id="finish-stop"),
        pytest.param(chunk({}, "length"), Delta(finish_reason="length"), id="finish-length"),
        pytest.param(chunk({}, "eos"), Delta(finish_reason="eos"), id="finish-unknown-kept"),
        pytest.param(chunk({}, ""), None, id="finish-empty-is-none"),
        pytest.param(chunk({"content": "x"}, ""), Delta("x"), id="content-with-empty-finish"),
        pytest.param(
            raw({"choices": [{"index": 0, "finish_reason": "stop"}]}),
            Delta(finish_reason="stop"),
            id="finish-without-delta",
        ),
        pytest.param(
            raw({"id": "c", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}}),
            Delta(usage=Usage(3, 4)),
            id="usage-chunk-empty-choices",
        ),
        pytest.param(
            raw({"id": "c", "usage": {"prompt_tokens": 3, "completion_tokens": 4}}),
            Delta(usage=Usage(3, 4)),
            id="usage-chunk-no-choices",
        ),
        pytest.param(chunk({"content": "x"}, usage=None), Delta("x"), id="usage-null-on-chunks"),
        pytest.param(
            chunk({"content": "."}, "stop", usage={"prompt_tokens": 1, "completion_tokens": 2}),
            Delta(".", finish_reason="stop", usage=Usage(1, 2)),
            id="usage-on-last-content-chunk",
        ),
        pytest.param(
            chunk(
                {},
                "stop",
                x_groq={"id": "g", "usage": {"prompt_tokens": 5, "completion_tokens": 6}},
            ),
            Delta(finish_reason="stop", usage=Usage(5, 6)),
            id="usage-in-x-groq",
        ),
        pytest.param(chunk({"content": "x"}, x_groq={"id": "g"}), Delta("x"), id="x-groq-no-usage"),
        pytest.param(
            raw({"choices": [], "usage": {"prompt_tokens": 5}}),
            Delta(usage=Usage(5, 0)),
            id="usage-partial",
        ),
        pytest.param(
            chunk(
                {"content": "x"},
                timings={"predicted_ms": 1},
                system_fingerprint="fp",
                obfuscation="abc",
                metrics={},
            ),
            Delta("x"),
            id="extra-fields-accepted",
        ),
        pytest.param(
            raw({"choices": [{"index": 0, "delta": {"content": "x"}, "matched_stop": None}]}),
            Delta("x"),
            id="no-finish-reason-key",
        ),
        pytest.param(
            raw({"choices": [{"delta": {"content": "x"}, "finish_reason": None}]}),
            Delta("x"),
            id="no-index-key",
        ),
        pytest.param(
            raw({"choices": [{"index": 1, "delta": {"content": "other"}, "finish_reason": None}]}),
            None,
            id="other-choice-ignored",
        ),
        pytest.param(
            raw(
                {
                    "choices": [
                        {"index": 1, "delta": {"content": "b"}, "finish_reason": None},
                        {"index": 0, "delta": {"content": "a"}, "finish_reason": None},
                    ]
                }
            ),
            Delta("a"),
            id="choice-zero-picked",
        ),
        pytest.param(
            chunk({"content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}),
            Delta("ab"),
            id="content-as-parts",
        ),
        pytest.param(
            chunk({"content": "x", "tool_calls": []}), Delta("x"), id="tool-calls-ignored"
        ),
        pytest.param(raw({"object": "chat.completion.chunk"}), None, id="no-choices-no-usage"),
    ],
)
def test_chunk(data: str, expected: Delta | None) -> None:
    assert parse_chunk(data) == expected


@pytest.mark.parametrize(
    ("data", "message", "code", "error_type"),
    [
        pytest.param(
            raw({"error": {"message": "boom", "type": "server_error", "code": "internal"}}),
            "boom",
            "internal",
            "server_error",
            id="nested",
        ),
        pytest.param(
            raw({"error": {"message": "m", "code": 500}}), "m", "500", None, id="int-code"
        ),
        pytest.param(raw({"error": "plain text"}), "plain text", None, None, id="string-error"),
        pytest.param(
            raw({"object": "error", "message": "flat", "type": "BadRequestError", "code": 400}),
            "flat",
            "400",
            "BadRequestError",
            id="flat-vllm",
        ),
        pytest.param(
            raw(
                {
                    "id": "c",
                    "error": {"code": 502, "message": "provider down"},
                    "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "error"}],
                }
            ),
            "provider down",
            "502",
            None,
            id="openrouter-error-with-choices",
        ),
        pytest.param(raw({"error": {}}), "upstream error", None, None, id="empty-error-object"),
    ],
)
def test_error_frame(data: str, message: str, code: str | None, error_type: str | None) -> None:
    with pytest.raises(UpstreamError) as info:
        parse_chunk(data)
    assert info.value.message == message
    assert info.value.code == code
    assert info.value.error_type == error_type
    assert info.value.delivered is False


@pytest.mark.parametrize(
    "data",
    [
        pytest.param("{not json", id="invalid-json"),
        pytest.param('{"choices": [', id="truncated-json"),
        pytest.param("", id="empty"),
        pytest.param("[1, 2]", id="array"),
        pytest.param("42", id="number"),
        pytest.param('"text"', id="string"),
        pytest.param(chunk({"content": 42}), id="content-number"),
        pytest.param(chunk({"content": {"text": "x"}}), id="content-object"),
        pytest.param(chunk({"content": ["x"]}), id="content-parts-not-objects"),
        pytest.param(chunk({"reasoning": 1}), id="reasoning-number"),
        pytest.param(raw({"choices": {"0": {}}}), id="choices-object"),
        pytest.param(raw({"choices": "abc"}), id="choices-string"),
        pytest.param(raw({"choices": ["abc"]}), id="choice-string"),
        pytest.param(raw({"choices": [{"index": 0, "delta": "x"}]}), id="delta-string"),
        pytest.param(raw({"choices": [{"index": 0, "delta": [1]}]}), id="delta-list"),
        pytest.param(chunk({}, 3), id="finish-number"),
        pytest.param(raw({"choices": [], "usage": "many"}), id="usage-string"),
        pytest.param(
            raw({"choices": [], "usage": {"prompt_tokens": "3", "completion_tokens": 1}}),
            id="usage-count-string",
        ),
    ],
)
def test_protocol_error(data: str) -> None:
    with pytest.raises(ProtocolError):
        parse_chunk(data)


def test_fast_delta_factory_builds_equal_deltas() -> None:
    usage = Usage(1, 2)
    made = make_delta("a", "b", "stop", usage)
    assert made == Delta("a", "b", "stop", usage)
    assert hash(made) == hash(Delta("a", "b", "stop", usage))
    assert type(made) is Delta
    with pytest.raises(AttributeError):
        made.content = "changed"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(
            b'{"error": {"message": "bad key", "type": "auth", "code": "invalid_api_key"}}',
            ("bad key", "invalid_api_key", "auth"),
            id="nested",
        ),
        pytest.param(
            b'{"object": "error", "message": "too long", "type": "BadRequestError", "code": 400}',
            ("too long", "400", "BadRequestError"),
            id="flat",
        ),
        pytest.param(b'{"detail": "Not Found"}', ("Not Found", None, None), id="fastapi-detail"),
        pytest.param(b"upstream connect error", ("upstream connect error", None, None), id="text"),
        pytest.param(b"", ("", None, None), id="empty"),
        pytest.param(b'{"unrelated": 1}', ('{"unrelated": 1}', None, None), id="other-json"),
    ],
)
def test_error_body(body: bytes, expected: tuple[str, str | None, str | None]) -> None:
    message, code, error_type = expected
    error = status_error(502, body, {}, "Bad Gateway")
    assert error.message == f"HTTP 502: {message or 'Bad Gateway'}"
    assert (error.code, error.error_type) == (code, error_type)


def test_error_body_text_is_bounded() -> None:
    error = status_error(502, b"x" * 10_000, {}, None)
    assert len(error.message) <= len("HTTP 502: ") + 500


def test_completion_body() -> None:
    body = orjson.dumps(
        {
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hi", "reasoning_content": "r"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 2, "completion_tokens": 1},
        }
    )
    assert parse_completion(body) == Delta("Hi", "r", "stop", Usage(2, 1))


def test_completion_body_error_and_garbage() -> None:
    with pytest.raises(UpstreamError):
        parse_completion(b'{"error": {"message": "no"}}')
    with pytest.raises(ProtocolError):
        parse_completion(b"{")
    with pytest.raises(ProtocolError):
        parse_completion(b'{"choices": []}')
    with pytest.raises(ProtocolError):
        parse_completion(b'{"choices": [{"index": 0, "message": {"content": 1}}]}')
