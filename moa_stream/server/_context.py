"""What the server's middleware and handlers share about one request.

:class:`RequestContext` gathers what a request did, for its log line and its metrics; the
middleware (:mod:`moa_stream.server._middleware`) makes one per request and the chat route
(:class:`moa_stream.server.app.ChatRoute`) fills it in. :func:`expect_handler` is every route's
``Expect`` handler.
"""

from __future__ import annotations

import time

import aiohttp
from aiohttp import web

from moa_stream.engine.run import MoARun
from moa_stream.server.errors import APIError
from moa_stream.tracing import RequestTrace

__all__ = ["CHAT_PATH", "CONTEXT", "UNMET_EXPECT", "RequestContext", "expect_handler"]

#: The one chat route: its requests are counted and logged as chat requests.
CHAT_PATH = "/v1/chat/completions"


class RequestContext:
    """What one request did, gathered for its log line and its metrics."""

    __slots__ = (
        "answered",
        "chat",
        "chunk_times",
        "completion_id",
        "created",
        "degraded",
        "error",
        "first_token_at",
        "hint",
        "model",
        "outcome",
        "progress",
        "request_id",
        "run",
        "started",
        "status",
        "steps",
        "stream",
        "trace",
    )

    def __init__(self, request_id: str, started: float) -> None:
        self.request_id = request_id
        self.started = started
        self.completion_id = f"chatcmpl-{request_id}"
        self.created = int(time.time())
        self.chat = False
        self.model: str | None = None
        self.stream: bool | None = None
        self.progress = False
        self.status = 0
        self.outcome: str | None = None
        self.error: APIError | None = None
        self.first_token_at: float | None = None
        self.run: MoARun | None = None
        self.degraded = False
        #: The whole answer, through ``[DONE]``, was handed to the transport. What happens
        #: afterwards (the run's clean-up, the client hanging up as curl and the SDKs do at
        #: the end of a stream) cannot make the request anything but the answer it was.
        self.answered = False
        #: When each answer chunk was written (monotonic), for the inter-token metrics.
        self.chunk_times: list[float] = []
        #: Staircase steps asked.
        self.steps = 0
        #: The request's spans, while tracing is on.
        self.trace: RequestTrace | None = None
        #: The config field to check after a failure (see :func:`moa_stream._probe.hint_for`).
        self.hint: str | None = None

    def fail(self, error: APIError) -> None:
        """Record ``error`` as the request's result."""
        self.error = error
        self.outcome = error.outcome


CONTEXT = web.RequestKey("moa_stream.context", RequestContext)
#: An ``Expect`` header this server cannot meet, left by :func:`expect_handler` for the
#: middleware to refuse (as JSON, logged and counted like every other error).
UNMET_EXPECT = web.RequestKey("moa_stream.unmet_expect", str)


async def expect_handler(request: web.Request) -> None:
    """The ``Expect`` handler of every route: ``100-continue`` as aiohttp does; anything else
    is noted for the middleware instead of aiohttp's own text/plain 417, which it writes
    before any middleware runs (so with no request log line and not as an OpenAI error)."""
    if request.version != aiohttp.HttpVersion11:
        return  # HTTP/1.0 has no Expect; aiohttp ignores it there too
    expect = request.headers.get("Expect", "")
    if expect.lower() != "100-continue":
        request[UNMET_EXPECT] = expect
        return
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    # The interim response is not part of the response's own size.
    request.writer.output_size = 0
