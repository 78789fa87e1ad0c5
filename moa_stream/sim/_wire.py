"""Canonical OpenAI chat-completions bytes, built with as little work per chunk as possible.

A stream's id, created time and model never change, so each request precomputes the bytes
before and after a token's content once; a chunk is then ``prefix + orjson.dumps(token) +
suffix``. Benchmarks run hundreds of streams on two cores, where this matters.
"""

from __future__ import annotations

from typing import Any

import orjson

__all__ = [
    "DONE",
    "KEEPALIVE",
    "ChunkEncoder",
    "completion_body",
    "error_body",
    "error_frame",
    "malformed_line",
]

DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keep-alive\n\n"


def error_body(message: str, error_type: str, code: str | None, param: str | None = None) -> bytes:
    """An OpenAI error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return orjson.dumps(
        {"error": {"message": message, "type": error_type, "param": param, "code": code}}
    )


def error_frame() -> bytes:
    """An error event inside a 200 stream, followed by ``[DONE]``, as OpenAI-compatible servers
    send when generation fails after the stream has started."""
    body = error_body(
        "The server had an error while processing your request.", "server_error", "internal_error"
    )
    return b"data: " + body + b"\n\n" + DONE


class ChunkEncoder:
    """Builds the SSE events of one streamed reply."""

    __slots__ = ("_content_prefix", "_content_suffix", "_head", "_usage_null")

    def __init__(self, completion_id: str, created: int, model: str, include_usage: bool) -> None:
        self._head = (
            b'data: {"id":'
            + orjson.dumps(completion_id)
            + b',"object":"chat.completion.chunk","created":'
            + str(created).encode()
            + b',"model":'
            + orjson.dumps(model)
            + b',"choices":['
        )
        # With include_usage every chunk carries "usage": null until the usage chunk.
        self._usage_null = b',"usage":null' if include_usage else b""
        self._content_prefix = self._head + b'{"index":0,"delta":{"content":'
        self._content_suffix = (
            b'},"logprobs":null,"finish_reason":null}]' + self._usage_null + b"}\n\n"
        )

    def role(self) -> bytes:
        """The first chunk: ``role: "assistant"`` with empty content."""
        return (
            self._head
            + b'{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,'
            + b'"finish_reason":null}]'
            + self._usage_null
            + b"}\n\n"
        )

    def content(self, token: str) -> bytes:
        """A content chunk."""
        return self._content_prefix + orjson.dumps(token) + self._content_suffix

    def content_with_extra(self, token: str, x_sim: dict[str, Any]) -> bytes:
        """A content chunk carrying the ``x_sim`` timing field (the first one)."""
        return (
            self._content_prefix
            + orjson.dumps(token)
            + b'},"logprobs":null,"finish_reason":null}]'
            + self._usage_null
            + b',"x_sim":'
            + orjson.dumps(x_sim)
            + b"}\n\n"
        )

    def finish(self, reason: str, x_sim: dict[str, Any] | None = None) -> bytes:
        """The chunk with an empty delta and the finish_reason."""
        extra = b"" if x_sim is None else b',"x_sim":' + orjson.dumps(x_sim)
        return (
            self._head
            + b'{"index":0,"delta":{},"logprobs":null,"finish_reason":'
            + orjson.dumps(reason)
            + b"}]"
            + self._usage_null
            + extra
            + b"}\n\n"
        )

    def usage(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> bytes:
        """The final usage chunk, with ``choices: []``."""
        return (
            self._head
            + b'],"usage":'
            + orjson.dumps(_usage(prompt_tokens, completion_tokens, cached_tokens))
            + b"}\n\n"
        )

    def malformed(self) -> bytes:
        """A ``data:`` line whose JSON is cut off."""
        return malformed_line(self._content_prefix)


def malformed_line(prefix: bytes) -> bytes:
    """``prefix`` plus an unterminated string: a data line that is not valid JSON."""
    return prefix + b'"unterminated\n\n'


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def completion_body(
    *,
    completion_id: str,
    created: int,
    model: str,
    text: str,
    finish_reason: str,
    prompt_tokens: int,
    completion_tokens: int,
    x_sim: dict[str, Any],
    cached_tokens: int = 0,
) -> bytes:
    """A non-streaming ``chat.completion`` object."""
    return orjson.dumps(
        {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
            ],
            "usage": _usage(prompt_tokens, completion_tokens, cached_tokens),
            "system_fingerprint": None,
            "x_sim": x_sim,
        }
    )
