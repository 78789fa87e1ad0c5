"""The simulator's bytes: the shared wire format (:mod:`moa_stream._wire`) plus what only a
simulator writes (its error frame) and the JSON response every route answers with.

The simulator does not keep a wire format of its own: it must send exactly what the server and
the client agree on, so a difference between them shows up in tests instead of in production.
"""

from __future__ import annotations

from aiohttp import web

from moa_stream._wire import DONE, KEEPALIVE, ChunkEncoder, completion_object, error_body

__all__ = [
    "DONE",
    "INTERNAL_ERROR",
    "KEEPALIVE",
    "ChunkEncoder",
    "completion_object",
    "error_body",
    "error_frame",
    "json_response",
]

#: The body of a 500 (and of the error frame): the server failed while generating.
INTERNAL_ERROR = error_body(
    "The server had an error while processing your request.", "server_error", "internal_error"
)


def error_frame() -> bytes:
    """An error event inside a 200 stream, followed by ``[DONE]``, as OpenAI-compatible servers
    send when generation fails after the stream has started."""
    return b"data: " + INTERNAL_ERROR + b"\n\n" + DONE


def json_response(
    body: bytes,
    status: int,
    request_id: str,
    headers: dict[str, str] | None = None,
    *,
    id_header: str = "x-request-id",
) -> web.Response:
    """A JSON response carrying the request's id in ``id_header`` (OpenAI's name by default;
    Anthropic's is ``request-id``) and any other ``headers``."""
    all_headers = {id_header: request_id}
    if headers:
        all_headers.update(headers)
    return web.Response(
        body=body, status=status, content_type="application/json", headers=all_headers
    )
