"""The simulator's bytes: the shared wire format (:mod:`moa_stream._wire`) plus the two
things only a simulator writes, its error frame and its ``x_sim`` timing field.

The simulator does not keep a wire format of its own: it must send exactly what the server and
the client agree on, so a difference between them shows up in tests instead of in production.
"""

from __future__ import annotations

from typing import Any

import orjson

from moa_stream._wire import DONE, KEEPALIVE, ChunkEncoder, completion_object, error_body

__all__ = [
    "DONE",
    "KEEPALIVE",
    "ChunkEncoder",
    "completion_body",
    "error_body",
    "error_frame",
]

_INTERNAL_ERROR = error_body(
    "The server had an error while processing your request.", "server_error", "internal_error"
)


def error_frame() -> bytes:
    """An error event inside a 200 stream, followed by ``[DONE]``, as OpenAI-compatible servers
    send when generation fails after the stream has started."""
    return b"data: " + _INTERNAL_ERROR + b"\n\n" + DONE


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
    """A non-streamed ``chat.completion`` object with the ``x_sim`` timings."""
    return orjson.dumps(
        completion_object(
            completion_id=completion_id,
            created=created,
            model=model,
            text=text,
            finish_reason=finish_reason,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            extra={"x_sim": x_sim},
            cached_tokens=cached_tokens,
        )
    )
