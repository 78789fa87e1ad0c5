"""The MoA endpoints inside an existing FastAPI application.

Two pieces:

- :func:`moa_router` is an ``APIRouter`` with ``POST /v1/chat/completions`` (streamed and not)
  and ``GET /v1/models[/{id}]`` for a set of MoAs: ``app.include_router(moa_router(runtime),
  prefix="/moa")`` makes ``/moa/v1`` a base URL for OpenAI clients.
- :class:`SSEResponse` (also named ``sse_response``) turns a run you started in your own endpoint
  into an OpenAI-compatible SSE response (a Starlette response: plain Starlette apps can
  return it too).

Requests are parsed, and results and errors written, by the server's own code
(:mod:`moa_stream._wire`, :mod:`moa_stream.server.errors`), so the bytes are the same as
``moa-stream serve`` sends. Authentication, CORS and metrics are the host application's: add
them as dependencies or middleware (``include_router(..., dependencies=[Depends(auth)])``).

A client that disconnects cancels the run, and with it every upstream request the run has
open, at once: each response listens for the ASGI ``http.disconnect`` message while it runs.
Install with ``pip install 'moa_stream[fastapi]'``. See ``docs/integrations.md``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Mapping
from typing import Any

try:
    from fastapi import APIRouter
    from fastapi.routing import APIRoute
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Match
    from starlette.types import Receive, Scope, Send
except ImportError as exc:  # pragma: no cover - exercised without the extra only
    raise ImportError(
        "moa_stream.integrations.fastapi needs FastAPI: pip install 'moa_stream[fastapi]'"
    ) from exc

from moa_stream.config import Runtime
from moa_stream.engine.run import MoARun
from moa_stream.engine.spec import MoA
from moa_stream.integrations._core import ChatEndpoints, complete_run, stream_run
from moa_stream.server.errors import APIError
from moa_stream.server.respond import (
    JSON_CONTENT_TYPE,
    REQUEST_ID_HEADER,
    SSE_HEADERS,
    Answer,
    ChatOptions,
    error_parts,
    new_request_id,
)
from moa_stream.tracing import RequestTrace

__all__ = ["SSEResponse", "moa_router", "sse_response"]


def _raw(headers: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]


def _error_response(error: APIError, request_id: str) -> Response:
    status, headers, body = error_parts(error, request_id)
    del headers["Content-Type"]  # the media type sets it
    return Response(content=body, status_code=status, headers=headers, media_type=JSON_CONTENT_TYPE)


def _json_response(body: bytes, request_id: str) -> Response:
    return Response(body, media_type=JSON_CONTENT_TYPE, headers={REQUEST_ID_HEADER: request_id})


async def _until_disconnect(receive: Receive, work: Coroutine[Any, Any, None]) -> None:
    """Run ``work`` until it ends or the client disconnects, whichever is first; then nothing
    of it is left running. A crash in ``work`` is re-raised."""

    async def disconnected() -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return

    loop = asyncio.get_running_loop()
    worker = loop.create_task(work)
    watcher = loop.create_task(disconnected())
    try:
        await asyncio.wait((worker, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        # Also when this task itself is cancelled (the server shutting down): the run must
        # not outlive the response.
        watcher.cancel()
        if not worker.done():
            worker.cancel()
        await asyncio.gather(worker, watcher, return_exceptions=True)
    if not worker.cancelled():
        worker.result()


class _ASGISink:
    """:class:`~moa_stream.server.respond.Sink` over an ASGI ``send``; ``extra`` headers (the
    application's) go beside the answer's, and win."""

    __slots__ = ("_extra", "_send", "started")

    def __init__(self, send: Send, extra: Mapping[str, str]) -> None:
        self._send = send
        self._extra = extra
        self.started = False

    async def start(self, headers: Mapping[str, str]) -> None:
        self.started = True
        merged = {k.lower(): v for k, v in headers.items()}
        merged.update((k.lower(), v) for k, v in self._extra.items())
        await self._send({"type": "http.response.start", "status": 200, "headers": _raw(merged)})

    async def write(self, data: bytes) -> None:
        try:
            await self._send({"type": "http.response.body", "body": data, "more_body": True})
        except OSError as exc:  # servers raise OSError subclasses once the client is gone
            raise ConnectionResetError(str(exc)) from exc

    async def end(self) -> None:
        try:
            await self._send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError as exc:
            raise ConnectionResetError(str(exc)) from exc


class _RunResponse(Response):
    """A response that runs a MoA while it is sent, so that a client that disconnects cancels
    the run (an endpoint awaiting the run would not notice). Subclasses write the answer in
    :meth:`_send`."""

    def __init__(
        self,
        run: MoARun,
        answer: Answer,
        *,
        request_timeout: float | None,
        trace: RequestTrace | None,
    ) -> None:
        self.run = run
        self.answer = answer
        self.trace = trace
        self.request_timeout = request_timeout
        self.status_code = 200
        self.background = None
        self.raw_headers = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _until_disconnect(receive, self._send(send))

    async def _send(self, send: Send) -> None:
        raise NotImplementedError


class _AnswerStream(_RunResponse):
    """A streamed chat completion of ``answer``, computed while the response is sent."""

    media_type = "text/event-stream"

    def __init__(
        self,
        run: MoARun,
        answer: Answer,
        *,
        request_timeout: float | None,
        headers: Mapping[str, str] | None,
        trace: RequestTrace | None,
    ) -> None:
        super().__init__(run, answer, request_timeout=request_timeout, trace=trace)
        self.extra_headers = dict(headers or {})
        # What the response is known to send (its headers go out with the first token).
        self.raw_headers = _raw(
            {**SSE_HEADERS, REQUEST_ID_HEADER: answer.request_id, **self.extra_headers}
        )

    async def _send(self, send: Send) -> None:
        try:
            await stream_run(
                self.run,
                _ASGISink(send, self.extra_headers),
                self.answer,
                request_timeout=self.request_timeout,
                trace=self.trace,
            )
        except APIError as error:
            await _send_error(send, error, self.answer.request_id)


class SSEResponse(_AnswerStream):
    """A response that runs a MoA and streams its answer as OpenAI chat-completion chunks.

    ``run`` comes from ``moa.stream(messages)`` and must not be entered yet: the response
    enters and closes it while it is sent. ``model`` is the name the chunks carry. The
    status goes out with the first answer token, so a run that fails before answering is
    answered with a JSON error and a real status (502; 504 past ``request_timeout``); a failure
    after that ends the stream with an error frame and ``[DONE]``. ``progress`` adds the
    server's ``: moa.progress`` comments. Each response has its own ``X-Request-Id``, as the
    server's do. A client that disconnects cancels the run.
    """

    def __init__(
        self,
        run: MoARun,
        *,
        model: str,
        include_usage: bool = False,
        progress: bool = False,
        request_timeout: float | None = None,
        headers: Mapping[str, str] | None = None,
        trace: RequestTrace | None = None,
    ) -> None:
        answer = Answer(model, ChatOptions(progress=progress), include_usage=include_usage)
        super().__init__(run, answer, request_timeout=request_timeout, headers=headers, trace=trace)
        self.model = model
        self.include_usage = include_usage
        self.progress = progress


class _CompletionResponse(_RunResponse):
    """A non-streamed chat completion, computed while the response is sent."""

    async def _send(self, send: Send) -> None:
        try:
            headers, body = await complete_run(
                self.run, self.answer, request_timeout=self.request_timeout, trace=self.trace
            )
        except APIError as error:
            await _send_error(send, error, self.answer.request_id)
            return
        await _send_json(send, 200, headers, body)


async def _send_json(send: Send, status: int, headers: Mapping[str, str], body: bytes) -> None:
    raw_headers = [(b"content-length", str(len(body)).encode()), *_raw(headers)]
    try:
        await send({"type": "http.response.start", "status": status, "headers": raw_headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})
    except OSError:
        pass  # the client is gone; there is no one left to answer


async def _send_error(send: Send, error: APIError, request_id: str) -> None:
    status, headers, body = error_parts(error, request_id)
    await _send_json(send, status, headers, body)


#: :class:`SSEResponse` under the name of the aiohttp integration's helper: return
#: ``sse_response(run, model=...)`` from an endpoint.
sse_response = SSEResponse


#: The router's own paths (below its prefix) and the methods they answer, for the 405s of the
#: fallback route.
_CHAT_PATH = "v1/chat/completions"
_MODELS_PATH = "v1/models"
_FALLBACK_PATH = "/{path:path}"
_ANY_METHOD = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def _allowed_methods(path: str) -> str | None:
    if path == _CHAT_PATH:
        return "POST"
    if path == _MODELS_PATH or (
        path.startswith(_MODELS_PATH + "/") and "/" not in path[len(_MODELS_PATH) + 1 :]
    ):
        return "GET"
    return None


class _FallbackRoute(APIRoute):
    """The router's last route: every other path and method below its prefix, answered with
    an OpenAI error (404, 405) instead of FastAPI's ``{"detail": ...}``. Included without a
    prefix, it takes only ``/v1/...``, leaving the application's own paths alone."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child = super().matches(scope)
        path = str(child.get("path_params", {}).get("path", ""))
        if match is Match.FULL and self.path == _FALLBACK_PATH and not path.startswith("v1/"):
            return Match.NONE, {}
        return match, child


def moa_router(
    moas: Runtime | Mapping[str, MoA],
    *,
    descriptions: Mapping[str, str] | None = None,
    request_timeout: float | None = None,
    max_body_bytes: int | None = None,
    **router_options: Any,
) -> APIRouter:
    """An ``APIRouter`` serving ``moas`` (a :class:`~moa_stream.config.Runtime`, or MoAs by
    model id) as OpenAI-compatible models, answering as ``moa-stream serve`` does.

    A runtime may be started after the router is made, in the application's lifespan; until
    then chat requests get 503 ``not_ready``.

    Routes: ``POST /v1/chat/completions`` (streamed with ``"stream": true``; the server's
    ``X-MoA-Progress`` and ``X-MoA-Reasoning`` headers and ``moa_stream`` body options included)
    and ``GET /v1/models``, ``GET /v1/models/{model_id}``. Every other path and method below the
    router's prefix (below ``/v1/`` without one) gets an OpenAI 404 or 405. Every response has
    an ``X-Request-Id``; every error OpenAI's ``{"error": {...}}`` body and ``x-should-retry``.
    ``request_timeout`` (seconds, 504 past it) and ``max_body_bytes`` (413) default to the
    runtime's ``[server]`` table, or 600 s and 1 MiB; so does ``reasoning_progress``.
    ``router_options`` go to ``APIRouter`` (``tags``, ``dependencies`` ...).
    """
    ids: list[str] | None = None
    reasoning: tuple[str, ...] = ()
    if isinstance(moas, Runtime):
        # The runtime may start later (in the application's lifespan): its MoAs are looked up
        # per request, and its config already names them.
        server = moas.config.server
        ids = list(moas.config.moas)
        descriptions = descriptions or {k: m.description for k, m in moas.config.moas.items()}
        timeout = server.request_timeout if request_timeout is None else request_timeout
        limit = server.max_body_bytes if max_body_bytes is None else max_body_bytes
        reasoning = server.reasoning_progress
        specs: Mapping[str, MoA] = moas.moas
    else:
        timeout = 600.0 if request_timeout is None else request_timeout
        limit = (1 << 20) if max_body_bytes is None else max_body_bytes
        specs = moas
    endpoints = ChatEndpoints(
        specs,
        model_ids=ids,
        descriptions=descriptions,
        request_timeout=timeout,
        max_body_bytes=limit,
        reasoning_progress=reasoning,
    )

    async def chat_completions(request: Request) -> Response:
        """OpenAI-compatible chat completions answered by a Mixture-of-Agents."""
        request_id = new_request_id()
        try:
            length = request.headers.get("content-length")
            endpoints.check_length(int(length) if length and length.isdigit() else None)
            raw = bytearray()
            async for piece in request.stream():
                raw += piece
                if len(raw) > endpoints.max_body_bytes:
                    raise APIError.body_too_large(endpoints.max_body_bytes)
            req, answer, run, trace = endpoints.open(
                bytes(raw), request.headers, request_id=request_id
            )
        except APIError as error:
            return _error_response(error, request_id)
        if req.stream:
            return _AnswerStream(
                run, answer, request_timeout=endpoints.request_timeout, headers=None, trace=trace
            )
        return _CompletionResponse(
            run, answer, request_timeout=endpoints.request_timeout, trace=trace
        )

    async def list_models() -> Response:
        """The MoAs, one model object each."""
        return _json_response(endpoints.models_body, new_request_id())

    async def get_model(model_id: str) -> Response:
        """One MoA's model object."""
        request_id = new_request_id()
        try:
            return _json_response(endpoints.model_body(model_id), request_id)
        except APIError as error:
            return _error_response(error, request_id)

    async def fallback(request: Request) -> Response:
        """An OpenAI error for every path and method the router has no route for."""
        allow = _allowed_methods(str(request.path_params.get("path", "")))
        error = (
            APIError.unknown_path(request.url.path)
            if allow is None
            else APIError.method_not_allowed(allow)
        )
        return _error_response(error, new_request_id())

    router = APIRouter(**router_options)
    router.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    router.add_api_route("/v1/models", list_models, methods=["GET"])
    router.add_api_route("/v1/models/{model_id}", get_model, methods=["GET"])
    router.add_api_route(
        _FALLBACK_PATH,
        fallback,
        methods=_ANY_METHOD,
        include_in_schema=False,
        route_class_override=_FallbackRoute,
    )
    return router
