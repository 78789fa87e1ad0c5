"""What the app integrations share, whatever the web framework: a run written as an
OpenAI-compatible SSE stream or completion object, and the endpoints' state.

The wire format and the error mapping are the server's own (:mod:`moa_stream._wire`,
:mod:`moa_stream.server.errors`); this module only drives them with a framework's way of
starting and writing a response (:class:`SSEOutput`). It keeps the server's header timing: the
status line goes out with the first answer token, so a run that fails before answering gets a
real error status (502, 504) instead of a 200 with an error inside.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Protocol

import orjson
import structlog

from moa_stream._exceptions import MoAError
from moa_stream._wire import (
    ChatCompletionRequest,
    ChunkEncoder,
    WireError,
    completion_object,
    extension,
    model_objects,
    parse_chat_request,
)
from moa_stream.engine.events import AggregatorDelta
from moa_stream.engine.run import MoARun
from moa_stream.engine.spec import MoA
from moa_stream.server.app import progress_level
from moa_stream.server.errors import APIError, from_moa_error, timeout_error
from moa_stream.server.progress import ProgressEncoder, report_object
from moa_stream.server.stream import StreamWriter
from moa_stream.tracing import RequestTrace, request_tracer

__all__ = [
    "ChatEndpoints",
    "SSEOutput",
    "SSE_HEADERS",
    "complete_run",
    "new_completion_id",
    "start_trace",
    "stream_run",
]

log = structlog.get_logger("moa_stream.integrations")

#: The headers of every stream. nginx buffers proxied responses unless told not to, and
#: buffering would hold back tokens.
SSE_HEADERS: Mapping[str, str] = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


class SSEOutput(Protocol):
    """How a framework starts a stream (status 200 and :data:`SSE_HEADERS`) and writes to it.

    ``write`` raises ``ConnectionResetError`` when the client has gone away.
    """

    @property
    def started(self) -> bool: ...

    async def start(self) -> None: ...

    async def write(self, data: bytes) -> None: ...


def new_completion_id() -> str:
    """A fresh ``chatcmpl-...`` id."""
    return f"chatcmpl-{uuid.uuid4().hex}"


def start_trace(model: str, *, stream: bool, completion_id: str | None) -> RequestTrace | None:
    """The spans of one request while tracing is on (see :mod:`moa_stream.tracing`), else
    None: then nothing of tracing runs for it."""
    tracer = request_tracer()
    if tracer is None:
        return None
    return RequestTrace(tracer, model, stream=stream, response_id=completion_id)


def _end_trace(
    trace: RequestTrace, run: MoARun, outcome: str, error: APIError | None, started: bool
) -> None:
    status: int | None = None
    if error is not None and not started:
        status = error.status  # answered with this status instead of a stream
    elif started or outcome == "ok":
        status = 200
    trace.end(
        run.report,
        outcome=outcome if error is None else error.outcome,
        status=status,
        error_type=None if error is None else error.code or error.outcome,
        error=None if error is None else error.message,
    )


async def stream_run(
    run: MoARun,
    out: SSEOutput,
    *,
    model: str,
    include_usage: bool = False,
    progress: bool = False,
    request_timeout: float | None = None,
    completion_id: str | None = None,
    trace: RequestTrace | None = None,
) -> None:
    """Run ``run`` and write it to ``out`` as an OpenAI chat-completions stream.

    The run is entered and closed here; cancelling the caller (a client that went away) closes
    it, and with it every upstream request it still had open. ``out`` is started at the first
    answer token (at once with ``progress``, whose comments are what the client waits for).
    An error before that raises :class:`~moa_stream.server.errors.APIError` and nothing has
    been written, so the caller can send it as an error response; an error after that is
    written as an error frame and ``[DONE]``. A client that goes away while we write ends the
    call quietly.

    While tracing is on the request gets its spans (``trace``, or ones started here; see
    :mod:`moa_stream.tracing`).
    """
    completion_id = completion_id or new_completion_id()
    if trace is None:
        trace = start_trace(model, stream=True, completion_id=completion_id)
    if trace is None:
        await _stream_run(
            run, out, model, include_usage, progress, request_timeout, completion_id, None
        )
        return
    outcome = "client_disconnected"  # unless the call ends otherwise: it was cancelled
    error: APIError | None = None
    trace.attach()
    try:
        outcome, error = await _stream_run(
            run, out, model, include_usage, progress, request_timeout, completion_id, trace
        )
    except APIError as exc:
        error = exc
        raise
    finally:
        trace.detach()
        _end_trace(trace, run, outcome, error, out.started)


async def _stream_run(
    run: MoARun,
    out: SSEOutput,
    model: str,
    include_usage: bool,
    progress: bool,
    request_timeout: float | None,
    completion_id: str,
    trace: RequestTrace | None,
) -> tuple[str, APIError | None]:
    """:func:`stream_run`'s work; returns the outcome and the error written mid-stream."""
    writer = StreamWriter(
        ChunkEncoder(completion_id, int(time.time()), model, include_usage),
        include_usage=include_usage,
        progress=ProgressEncoder() if progress else None,
    )
    write = out.write
    finished = False
    error: APIError | None = None
    async with run:
        try:
            async with asyncio.timeout(request_timeout):
                if writer.eager:
                    await out.start()
                async for event in run.events():
                    if isinstance(event, AggregatorDelta):
                        if not out.started:
                            await out.start()
                        await write(writer.answer(event.text))
                    elif event.type == "run.done":
                        # Written before the run closes: closing may wait for "keep"
                        # stragglers, and the client must not.
                        tail = writer.done(event)
                        if not out.started:
                            await out.start()
                        await write(tail)
                        finished = True
                    else:
                        if trace is not None and event.type != "proposer.delta":
                            trace.event(event)
                        frames = writer.event(event)
                        if frames is not None:
                            await write(frames)
        except MoAError as exc:
            error = from_moa_error(exc)
        except TimeoutError:
            error = timeout_error(request_timeout or 0.0)
        except ConnectionResetError:
            # The client went away; leaving the block cancels the run.
            return ("ok" if finished else "client_disconnected"), None
        except Exception:
            log.exception("stream.crashed", model=model)
            error = APIError.internal()
        if error is None and not finished:
            log.error("stream.ended_without_report", model=model)
            error = APIError.internal()
        if error is not None:
            if not out.started:
                raise error
            with contextlib.suppress(ConnectionResetError):
                await write(writer.error(error))
    return "ok", error


async def complete_run(
    run: MoARun,
    *,
    model: str,
    progress: bool = False,
    request_timeout: float | None = None,
    completion_id: str | None = None,
    trace: RequestTrace | None = None,
) -> bytes:
    """Run ``run`` to its end and return the ``chat.completion`` JSON body.

    Errors are :class:`~moa_stream.server.errors.APIError` (502 for a failed run, 504 past
    ``request_timeout``). With ``progress`` the body carries the run's report under
    ``moa_stream``, as the server's does. While tracing is on the request gets its spans
    (``trace``, or ones started here).
    """
    completion_id = completion_id or new_completion_id()
    if trace is None:
        trace = start_trace(model, stream=False, completion_id=completion_id)
    if trace is None:
        return await _complete_run(run, model, progress, request_timeout, completion_id, None)
    outcome = "client_disconnected"  # unless the call ends otherwise: it was cancelled
    error: APIError | None = None
    trace.attach()
    try:
        body = await _complete_run(run, model, progress, request_timeout, completion_id, trace)
        outcome = "ok"
        return body
    except APIError as exc:
        error = exc
        raise
    finally:
        trace.detach()
        _end_trace(trace, run, outcome, error, False)


async def _complete_run(
    run: MoARun,
    model: str,
    progress: bool,
    request_timeout: float | None,
    completion_id: str,
    trace: RequestTrace | None,
) -> bytes:
    report = None
    async with run:
        try:
            async with asyncio.timeout(request_timeout):
                async for event in run.events():
                    if event.type == "run.done":
                        report = event.report
                    elif (
                        trace is not None
                        and event.type != "proposer.delta"
                        and event.type != "aggregator.delta"
                    ):
                        trace.event(event)
        except MoAError as exc:
            raise from_moa_error(exc) from None
        except TimeoutError:
            raise timeout_error(request_timeout or 0.0) from None
        except Exception:
            # A bug: the log gets the traceback, the client an error body it can act on.
            log.exception("completion.crashed", model=model)
            raise APIError.internal() from None
    if report is None:
        raise APIError.internal()
    body = completion_object(
        completion_id=completion_id,
        created=int(time.time()),
        model=model,
        text=report.text,
        finish_reason=report.finish_reason or "stop",
        prompt_tokens=report.usage.prompt_tokens,
        completion_tokens=report.usage.completion_tokens,
        extra={"moa_stream": report_object(report)} if progress else None,
    )
    return orjson.dumps(body)


class ChatEndpoints:
    """The state behind the OpenAI-compatible endpoints an integration mounts: the MoAs by
    model id, their ``/v1/models`` objects, and the request limits.

    ``request_timeout`` bounds a whole request (504 past it); ``max_body_bytes`` the request
    body (413). Authentication, CORS and metrics are left to the host application.
    """

    def __init__(
        self,
        moas: Mapping[str, MoA],
        *,
        model_ids: Sequence[str] | None = None,
        descriptions: Mapping[str, str] | None = None,
        request_timeout: float | None = 600.0,
        max_body_bytes: int = 1 << 20,
    ) -> None:
        # Not copied: a Runtime fills its ``moas`` when it starts, which may be after this.
        self.moas = moas
        ids = list(moas) if model_ids is None else list(model_ids)
        if not ids:
            raise ValueError("at least one MoA is needed")
        self.request_timeout = request_timeout
        self.max_body_bytes = max_body_bytes
        self._model_objects = model_objects(ids, descriptions)
        self.models_body = orjson.dumps(
            {"object": "list", "data": list(self._model_objects.values())}
        )

    def model_body(self, model_id: str) -> bytes:
        """One ``model`` object, or a 404 :class:`APIError`."""
        obj = self._model_objects.get(model_id)
        if obj is None:
            raise APIError.model_not_found(model_id, list(self._model_objects))
        return orjson.dumps(obj)

    def check_length(self, content_length: int | None) -> None:
        """413 before reading a body whose declared length is over the limit."""
        if content_length is not None and content_length > self.max_body_bytes:
            raise APIError.body_too_large(self.max_body_bytes)

    def open(
        self, raw: bytes, *, progress_header: str | None = None
    ) -> tuple[ChatCompletionRequest, MoARun, bool, RequestTrace | None]:
        """Parse a chat-completions body and create (not start) its run; the third item says
        whether progress was asked for (``X-MoA-Progress`` or ``moa_stream.progress``), the
        fourth is the request's spans while tracing is on (the run's upstream requests are
        then traced too)."""
        if len(raw) > self.max_body_bytes:
            raise APIError.body_too_large(self.max_body_bytes)
        try:
            req = parse_chat_request(raw)
            progress, _ = progress_level(extension(req.body, "moa_stream"), progress_header)
        except WireError as exc:
            raise APIError.from_wire(exc) from None
        if req.model not in self._model_objects:
            raise APIError.model_not_found(req.model, list(self._model_objects))
        spec = self.moas.get(req.model)
        if spec is None:
            raise APIError(
                503,
                "The MoA runtime has not started yet. Retry shortly.",
                error_type="server_error",
                code="not_ready",
                outcome="not_ready",
                headers={"Retry-After": "1"},
            )
        trace = start_trace(req.model, stream=req.stream, completion_id=None)
        if trace is not None:
            spec = trace.instrument(spec)
        run = spec.stream(
            req.messages, temperature=req.temperature, max_tokens=req.max_tokens, stop=req.stop
        )
        return req, run, progress, trace
