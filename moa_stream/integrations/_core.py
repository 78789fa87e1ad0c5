"""What the app integrations share, whatever the web framework: a run answered as
``moa-stream serve`` answers it, and the endpoints' state.

Every part of the response (the request's options, the ids, the headers, the stream's bytes, the
whole completion, the errors) is made by :mod:`moa_stream.server.respond`, the module the server
uses too; a framework only supplies a :class:`~moa_stream.server.respond.Sink` (how it starts a
response and writes to it) and sends the parts this module returns. The header timing is the
server's: the status line goes out with the first answer token, so a run that fails before
answering gets a real error status (502, 504) instead of a 200 with an error inside.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Callable, Mapping, Sequence

import orjson
import structlog

from moa_stream._exceptions import MoAError
from moa_stream._wire import ChatCompletionRequest, model_objects
from moa_stream.engine.events import Event
from moa_stream.engine.run import MoARun
from moa_stream.engine.spec import MoA
from moa_stream.server.errors import APIError, from_moa_error, timeout_error
from moa_stream.server.respond import Answer, Sink, collect, parse_chat, pump
from moa_stream.tracing import RequestTrace, request_tracer

__all__ = ["ChatEndpoints", "complete_run", "start_trace", "stream_run"]

log = structlog.get_logger("moa_stream.integrations")


def start_trace(
    model: str,
    *,
    stream: bool,
    completion_id: str | None,
    headers: Mapping[str, str] | None = None,
) -> RequestTrace | None:
    """The spans of one request while tracing is on (see :mod:`moa_stream.tracing`), else
    None: then nothing of tracing runs for it. ``headers`` (the request's) may carry the
    client's ``traceparent``."""
    tracer = request_tracer()
    if tracer is None:
        return None
    return RequestTrace(tracer, model, headers=headers, stream=stream, response_id=completion_id)


def _observer(trace: RequestTrace | None) -> Callable[[Event], None] | None:
    if trace is None:
        return None
    record = trace.event

    def observe(event: Event) -> None:
        if event.type != "proposer.delta" and event.type != "aggregator.delta":
            record(event)

    return observe


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
    sink: Sink,
    answer: Answer,
    *,
    request_timeout: float | None = None,
    trace: RequestTrace | None = None,
) -> None:
    """Run ``run`` and write it to ``sink`` as ``answer``'s chat-completions stream.

    The run is entered and closed here; cancelling the caller (a client that went away) closes
    it, and with it every upstream request it still had open. An error before the headers went
    out raises :class:`~moa_stream.server.errors.APIError` and nothing has been written, so
    the caller can send it as an error response
    (:func:`~moa_stream.server.respond.error_parts`); an error after that is written as an
    error frame and ``[DONE]``, and the body ended. A client that goes away while we write
    ends the call quietly. While tracing is on the request gets its spans (``trace``, or
    ones started here; see :mod:`moa_stream.tracing`).
    """
    if trace is None:
        trace = start_trace(answer.model, stream=True, completion_id=answer.completion_id)
    if trace is None:
        await _stream_run(run, sink, answer, request_timeout, None)
        return
    outcome = "client_disconnected"  # unless the call ends otherwise: it was cancelled
    error: APIError | None = None
    trace.attach()
    try:
        outcome, error = await _stream_run(run, sink, answer, request_timeout, trace)
    except APIError as exc:
        error = exc
        raise
    finally:
        trace.detach()
        _end_trace(trace, run, outcome, error, sink.started)


async def _stream_run(
    run: MoARun,
    sink: Sink,
    answer: Answer,
    request_timeout: float | None,
    trace: RequestTrace | None,
) -> tuple[str, APIError | None]:
    """:func:`stream_run`'s work; returns the outcome and the error written mid-stream."""
    writer = answer.writer()
    answered: list[bool] = []
    error: APIError | None = None
    async with run:
        try:
            async with asyncio.timeout(request_timeout):
                await pump(
                    answer,
                    run,
                    writer,
                    sink,
                    observe=_observer(trace),
                    on_answered=lambda: answered.append(True),
                )
        except MoAError as exc:
            error = from_moa_error(exc)
        except TimeoutError:
            error = timeout_error(request_timeout or 0.0)
        except ConnectionResetError:
            # The client went away; leaving the block cancels the run. After the answer's
            # end it had everything.
            return ("ok" if answered else "client_disconnected"), None
        except Exception:
            log.exception("stream.crashed", model=answer.model, request_id=answer.request_id)
            error = APIError.internal()
        if error is None and not answered:
            log.error("stream.ended_without_report", request_id=answer.request_id)
            error = APIError.internal()
        if error is not None:
            if not sink.started:
                raise error
            with contextlib.suppress(ConnectionResetError):
                await sink.write(writer.error(error))
                await sink.end()
    return "ok", error


async def complete_run(
    run: MoARun,
    answer: Answer,
    *,
    request_timeout: float | None = None,
    trace: RequestTrace | None = None,
) -> tuple[dict[str, str], bytes]:
    """Run ``run`` to its end; the headers and body of ``answer``'s ``chat.completion``.

    Errors are :class:`~moa_stream.server.errors.APIError` (502 for a failed run, 504 past
    ``request_timeout``). While tracing is on the request gets its spans (``trace``, or ones
    started here).
    """
    if trace is None:
        trace = start_trace(answer.model, stream=False, completion_id=answer.completion_id)
    if trace is None:
        return await _complete_run(run, answer, request_timeout, None)
    outcome = "client_disconnected"  # unless the call ends otherwise: it was cancelled
    error: APIError | None = None
    trace.attach()
    try:
        parts = await _complete_run(run, answer, request_timeout, trace)
        outcome = "ok"
        return parts
    except APIError as exc:
        error = exc
        raise
    finally:
        trace.detach()
        _end_trace(trace, run, outcome, error, False)


async def _complete_run(
    run: MoARun, answer: Answer, request_timeout: float | None, trace: RequestTrace | None
) -> tuple[dict[str, str], bytes]:
    async with run:
        try:
            async with asyncio.timeout(request_timeout):
                report = await collect(run, _observer(trace))
        except MoAError as exc:
            raise from_moa_error(exc) from None
        except TimeoutError:
            raise timeout_error(request_timeout or 0.0) from None
        except Exception:
            # A bug: the log gets the traceback, the client an error body it can act on.
            log.exception("completion.crashed", model=answer.model, request_id=answer.request_id)
            raise APIError.internal() from None
    if report is None:
        log.error("run.ended_without_report", request_id=answer.request_id)
        raise APIError.internal()
    return answer.completion(report)


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
        reasoning_progress: Sequence[str] = (),
    ) -> None:
        # Not copied: a Runtime fills its ``moas`` when it starts, which may be after this.
        self.moas = moas
        ids = list(moas) if model_ids is None else list(model_ids)
        if not ids:
            raise ValueError("at least one MoA is needed")
        self.request_timeout = request_timeout
        self.max_body_bytes = max_body_bytes
        self._reasoning_progress = frozenset(reasoning_progress)
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
        self, raw: bytes, headers: Mapping[str, str], *, request_id: str | None = None
    ) -> tuple[ChatCompletionRequest, Answer, MoARun, RequestTrace | None]:
        """Parse a chat-completions request as the server does and create (not start) its
        run: the request, its :class:`~moa_stream.server.respond.Answer` (options from the body
        and the ``X-MoA-Progress`` / ``X-MoA-Reasoning`` headers), the run, and the request's
        spans while tracing is on (the run's upstream requests are then traced too)."""
        if len(raw) > self.max_body_bytes:
            raise APIError.body_too_large(self.max_body_bytes)
        req, options = parse_chat(raw, headers)
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
        if not options.reasoning and (
            "*" in self._reasoning_progress or req.model in self._reasoning_progress
        ):
            options = dataclasses.replace(options, reasoning=True)
        answer = Answer(req.model, options, include_usage=req.include_usage, request_id=request_id)
        trace = start_trace(
            req.model, stream=req.stream, completion_id=answer.completion_id, headers=headers
        )
        if trace is not None:
            spec = trace.instrument(spec)
        run = spec.stream(
            req.messages, temperature=req.temperature, max_tokens=req.max_tokens, stop=req.stop
        )
        return req, answer, run, trace
