"""One chat request's HTTP response, whatever web framework writes it.

``moa-stream serve`` (:mod:`moa_stream.server.app`) and the app integrations
(:mod:`moa_stream.integrations`) answer a chat request with the same parts, all made here:

- the request's options (:func:`parse_chat`): the body's ``moa_stream`` extension, validated
  as the server does (400 ``invalid_type``), and the ``X-MoA-Progress`` and ``X-MoA-Reasoning``
  headers;
- the request id (``X-Request-Id``), which is also the completion id's tail and what each
  progress item carries;
- a stream's headers (with ``X-MoA-Degraded`` when due) and its bytes (:class:`Answer` makes the
  :class:`~moa_stream.server.stream.StreamWriter`; :func:`pump` drives it over a :class:`Sink`);
- a whole completion's headers and body, its ``usage_estimated`` and ``degraded`` marks
  included (:meth:`Answer.completion`);
- an error's status, headers (``x-should-retry``, ``Retry-After`` ...) and body
  (:func:`error_parts`).

What is left to the framework is writing those bytes: :class:`Sink` is the whole of it for a
stream. What stays with the server alone is its own state: API keys, CORS, limits on
concurrency, metrics, shutdown.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
from aiohttp import web

from moa_stream._wire import (
    ChatCompletionRequest,
    ChunkEncoder,
    WireError,
    completion_object,
    extension,
    optional_bool,
    parse_chat_request,
    wrong_type,
)
from moa_stream.engine.events import AggregatorDelta, Event, RunReport
from moa_stream.engine.run import MoARun
from moa_stream.server.errors import APIError
from moa_stream.server.progress import ProgressEncoder, report_object
from moa_stream.server.stream import StreamWriter, is_degraded

__all__ = [
    "DEGRADED_HEADER",
    "JSON_CONTENT_TYPE",
    "PROGRESS_HEADER",
    "PROGRESS_TEXT",
    "REASONING_HEADER",
    "REQUEST_ID_HEADER",
    "SSE_HEADERS",
    "Answer",
    "ChatOptions",
    "ResponseSink",
    "Sink",
    "collect",
    "error_parts",
    "new_request_id",
    "parse_chat",
    "progress_level",
    "pump",
    "truthy_header",
]

#: The request header that turns progress on (``1``, ``true``, ``yes`` or ``on``; ``text`` also
#: forwards the proposers' text).
PROGRESS_HEADER = "X-MoA-Progress"
#: The request header that turns the proposers' progress as ``reasoning_content`` on.
REASONING_HEADER = "X-MoA-Reasoning"
#: The response header of an answer written with no proposer's help (every one failed).
DEGRADED_HEADER = "X-MoA-Degraded"
#: The response header naming the request (in the log line, the progress items, the
#: completion id).
REQUEST_ID_HEADER = "X-Request-Id"
#: The progress level that also forwards the proposers' text: ``X-MoA-Progress: text`` or
#: ``"moa_stream": {"progress": "text"}``.
PROGRESS_TEXT = "text"

JSON_CONTENT_TYPE = "application/json"

#: The headers of every stream. nginx buffers proxied responses unless told not to, and
#: buffering would hold back tokens.
SSE_HEADERS: Mapping[str, str] = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


def truthy_header(value: str | None) -> bool:
    """Whether a flag header (``X-MoA-Progress``) is set: ``1``, ``true``, ``yes`` or ``on``."""
    return value is not None and value.strip().lower() in ("1", "true", "yes", "on")


def progress_level(options: Mapping[str, Any], header: str | None) -> tuple[bool, bool]:
    """``(progress, text)`` asked for by the body's ``moa_stream`` options and the
    ``X-MoA-Progress`` header: progress is on with a truthy header, ``text``, or
    ``"progress": true`` / ``"text"`` in the body; text only with ``text``."""
    value = options.get("progress")
    if value == PROGRESS_TEXT:
        return True, True
    if value is not None and not isinstance(value, bool):
        raise wrong_type("moa_stream.progress", 'a boolean or "text"', value)
    header_text = header is not None and header.strip().lower() == PROGRESS_TEXT
    return bool(value) or header_text or truthy_header(header), header_text


@dataclass(frozen=True, slots=True)
class ChatOptions:
    """What a chat request asked for beyond OpenAI's fields."""

    #: ``: moa.progress`` comments in a stream, the run's report in a whole completion.
    progress: bool = False
    #: The proposers' text in the progress too (``text``).
    progress_text: bool = False
    #: The proposers' progress as ``reasoning_content`` deltas.
    reasoning: bool = False


def parse_chat(raw: bytes, headers: Mapping[str, str]) -> tuple[ChatCompletionRequest, ChatOptions]:
    """A chat-completions body and the request's headers as the request and its options.

    ``headers`` is the framework's case-insensitive mapping. Raises a 400
    :class:`~moa_stream.server.errors.APIError` for a body the server refuses.
    """
    try:
        req = parse_chat_request(raw)
        body_options = extension(req.body, "moa_stream")
        progress, text = progress_level(body_options, headers.get(PROGRESS_HEADER))
        reasoning = optional_bool(body_options, "reasoning", "moa_stream.reasoning")
    except WireError as exc:
        raise APIError.from_wire(exc) from None
    reasoning = reasoning or truthy_header(headers.get(REASONING_HEADER))
    return req, ChatOptions(progress=progress, progress_text=text, reasoning=reasoning)


def new_request_id() -> str:
    """A fresh request id (32 hex digits)."""
    return uuid.uuid4().hex


def error_parts(
    error: APIError, request_id: str | None = None
) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of the JSON response for ``error``: ``x-should-retry`` and the
    error's own headers (``Retry-After``, ``Allow`` ...) included, and ``X-Request-Id`` given
    ``request_id``."""
    headers = {"Content-Type": JSON_CONTENT_TYPE, **error.response_headers()}
    if request_id is not None:
        headers[REQUEST_ID_HEADER] = request_id
    return error.status, headers, error.body()


class Answer:
    """The response of one chat request: its ids, a stream's writer and headers, or a whole
    completion's headers and body."""

    __slots__ = ("completion_id", "created", "include_usage", "model", "options", "request_id")

    def __init__(
        self,
        model: str,
        options: ChatOptions,
        *,
        include_usage: bool = False,
        request_id: str | None = None,
        created: int | None = None,
    ) -> None:
        self.model = model
        self.options = options
        self.include_usage = include_usage
        self.request_id = request_id if request_id is not None else new_request_id()
        self.completion_id = f"chatcmpl-{self.request_id}"
        self.created = int(time.time()) if created is None else created

    def writer(self) -> StreamWriter:
        """The stream's writer (with progress items carrying the request id, ``seq`` and
        ``ts``, when progress was asked for)."""
        options = self.options
        return StreamWriter(
            ChunkEncoder(self.completion_id, self.created, self.model, self.include_usage),
            include_usage=self.include_usage,
            progress=(
                ProgressEncoder(text=options.progress_text, request_id=self.request_id)
                if options.progress
                else None
            ),
            reasoning=options.reasoning,
        )

    def stream_headers(self, writer: StreamWriter) -> dict[str, str]:
        """A stream's headers as they go out now (``X-MoA-Degraded`` once a layer went on
        without any proposer's answer)."""
        headers = {**SSE_HEADERS, REQUEST_ID_HEADER: self.request_id}
        if writer.degraded:
            headers[DEGRADED_HEADER] = "true"
        return headers

    def completion(self, report: RunReport) -> tuple[dict[str, str], bytes]:
        """Headers and body of the whole completion of a run that ended with ``report``."""
        ext: dict[str, Any] = {}
        if self.options.progress:
            ext.update(report_object(report))
        headers = {"Content-Type": JSON_CONTENT_TYPE, REQUEST_ID_HEADER: self.request_id}
        if is_degraded(report):
            ext["degraded"] = True
            headers[DEGRADED_HEADER] = "true"
        if report.usage.estimated:
            # Beside the standard usage object, not inside it: strict clients keep parsing it.
            ext["usage_estimated"] = True
        body = completion_object(
            completion_id=self.completion_id,
            created=self.created,
            model=self.model,
            text=report.text,
            finish_reason=report.finish_reason or "stop",
            prompt_tokens=report.usage.prompt_tokens,
            completion_tokens=report.usage.completion_tokens,
            extra={"moa_stream": ext} if ext else None,
        )
        return headers, orjson.dumps(body)


class Sink(Protocol):
    """Where a stream's bytes go: a framework's response.

    ``start`` sends status 200 with ``headers``; ``write`` raises ``ConnectionResetError``
    once the client has gone away; ``end`` ends the body.
    """

    @property
    def started(self) -> bool: ...

    async def start(self, headers: Mapping[str, str]) -> None: ...

    async def write(self, data: bytes) -> None: ...

    async def end(self) -> None: ...


class ResponseSink:
    """:class:`Sink` over an aiohttp stream response (the server's, and the aiohttp
    integration's)."""

    __slots__ = ("_request", "response")

    def __init__(self, request: web.BaseRequest, response: web.StreamResponse) -> None:
        self._request = request
        self.response = response

    @property
    def started(self) -> bool:
        return self.response.prepared

    async def start(self, headers: Mapping[str, str]) -> None:
        self.response.headers.update(headers)
        await self.response.prepare(self._request)

    async def write(self, data: bytes) -> None:
        await self.response.write(data)

    async def end(self) -> None:
        await self.response.write_eof()


async def pump(
    answer: Answer,
    run: MoARun,
    writer: StreamWriter,
    sink: Sink,
    *,
    observe: Callable[[Event], None] | None = None,
    chunk_times: list[float] | None = None,
    on_first_token: Callable[[], None] | None = None,
    on_answered: Callable[[], None] | None = None,
) -> bool:
    """Write ``run``'s events (the run entered already) to ``sink`` as a chat-completions
    stream; True once the run's tail (``[DONE]`` included) is written and the body ended.

    The headers go out at once when the writer has something to send before the answer
    (progress, reasoning), else with the first answer token or the tail, so a run that fails
    before answering can still be answered with an error status. ``observe`` sees every event
    but the answer's tokens and the end; ``chunk_times`` gets the monotonic time of each answer
    chunk; ``on_first_token`` is called when the first one is about to be written,
    ``on_answered`` once the client has the whole answer. Errors of the run and of the sink
    (``ConnectionResetError``) propagate; the events are read to their end otherwise, so that
    the run's generator finishes.
    """
    write = sink.write
    clock = time.monotonic
    chunk_at = None if chunk_times is None else chunk_times.append
    first = True
    finished = False
    if writer.eager:
        await sink.start(answer.stream_headers(writer))
    async for event in run.events():
        # isinstance, not event.type: the cheapest test on the per-token path.
        if isinstance(event, AggregatorDelta):
            if first:
                first = False
                if not sink.started:
                    await sink.start(answer.stream_headers(writer))
                if on_first_token is not None:
                    on_first_token()
            if chunk_at is not None:
                chunk_at(clock())
            await write(writer.answer(event.text))
        elif event.type == "run.done":
            # Written here, not after the run is closed: closing may wait for "keep"
            # stragglers, and the client must not.
            tail = writer.done(event)
            if not sink.started:
                await sink.start(answer.stream_headers(writer))
            await write(tail)
            # From here on the client has the whole answer, [DONE] included: it may hang up
            # before the body's last bytes, and that is no disconnect.
            finished = True
            if on_answered is not None:
                on_answered()
            await sink.end()
        else:
            if observe is not None:
                observe(event)
            frames = writer.event(event)
            if frames is not None:
                await write(frames)
    return finished


async def collect(run: MoARun, observe: Callable[[Event], None] | None = None) -> RunReport | None:
    """Read ``run``'s events (the run entered already) to their end; the report of its
    ``run.done``, or None if it ended without one. ``observe`` sees every other event."""
    report = None
    async for event in run.events():
        if event.type == "run.done":
            report = event.report
        elif observe is not None:
            observe(event)
    return report
