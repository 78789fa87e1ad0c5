"""The MoA endpoints inside an existing FastAPI application.

Two pieces:

- :func:`moa_router` is an ``APIRouter`` with ``POST /v1/chat/completions`` (streamed and not)
  and ``GET /v1/models[/{id}]`` for a set of MoAs: ``app.include_router(moa_router(runtime),
  prefix="/moa")`` makes ``/moa/v1`` a base URL for OpenAI clients.
- :class:`SSEResponse` (or :func:`sse_response`) turns a run you started in your own endpoint
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
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.types import Receive, Scope, Send
except ImportError as exc:  # pragma: no cover - exercised without the extra only
    raise ImportError(
        "moa_stream.integrations.fastapi needs FastAPI: pip install 'moa_stream[fastapi]'"
    ) from exc

import contextlib

from moa_stream.config import Runtime
from moa_stream.engine.run import MoARun
from moa_stream.engine.spec import MoA
from moa_stream.integrations._core import SSE_HEADERS, ChatEndpoints, complete_run, stream_run
from moa_stream.server.app import PROGRESS_HEADER
from moa_stream.server.errors import APIError
from moa_stream.tracing import RequestTrace

__all__ = ["SSEResponse", "moa_router", "sse_response"]

_JSON = "application/json"


def _error_response(error: APIError) -> Response:
    return Response(
        content=error.body(), status_code=error.status, headers=error.headers, media_type=_JSON
    )


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


class _ASGIOutput:
    """:class:`~moa_stream.integrations._core.SSEOutput` over an ASGI ``send``."""

    __slots__ = ("_headers", "_send", "started")

    def __init__(self, send: Send, headers: list[tuple[bytes, bytes]]) -> None:
        self._send = send
        self._headers = headers
        self.started = False

    async def start(self) -> None:
        self.started = True
        await self._send({"type": "http.response.start", "status": 200, "headers": self._headers})

    async def write(self, data: bytes) -> None:
        try:
            await self._send({"type": "http.response.body", "body": data, "more_body": True})
        except OSError as exc:  # servers raise OSError subclasses once the client is gone
            raise ConnectionResetError(str(exc)) from exc


class SSEResponse(Response):
    """A response that runs a MoA and streams its answer as OpenAI chat-completion chunks.

    ``run`` comes from ``moa.stream(messages)`` and must not be entered yet: the response
    enters and closes it while it is sent. ``model`` is the name the chunks carry. The
    status goes out with the first answer token, so a run that fails before answering is
    answered with a JSON error and a real status (502; 504 past ``request_timeout``); a failure
    after that ends the stream with an error frame and ``[DONE]``. ``progress`` adds the
    server's ``: moa.progress`` comments. A client that disconnects cancels the run.
    """

    media_type = "text/event-stream"

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
        self.run = run
        self.trace = trace
        self.model = model
        self.include_usage = include_usage
        self.progress = progress
        self.request_timeout = request_timeout
        self.status_code = 200
        self.background = None
        merged = {**SSE_HEADERS, **(headers or {})}
        self.raw_headers = [
            (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in merged.items()
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _until_disconnect(receive, self._send_stream(send))

    async def _send_stream(self, send: Send) -> None:
        out = _ASGIOutput(send, self.raw_headers)
        try:
            await stream_run(
                self.run,
                out,
                model=self.model,
                include_usage=self.include_usage,
                progress=self.progress,
                request_timeout=self.request_timeout,
                trace=self.trace,
            )
        except APIError as error:
            await _send_error(send, error)
            return
        if out.started:
            with contextlib.suppress(OSError):
                await send({"type": "http.response.body", "body": b"", "more_body": False})


class _CompletionResponse(Response):
    """A non-streamed chat completion, computed while the response is sent so that a client
    that disconnects cancels the run (an endpoint awaiting the run would not notice)."""

    def __init__(
        self,
        run: MoARun,
        *,
        model: str,
        progress: bool,
        request_timeout: float | None,
        trace: RequestTrace | None = None,
    ) -> None:
        self.run = run
        self.trace = trace
        self.model = model
        self.progress = progress
        self.request_timeout = request_timeout
        self.status_code = 200
        self.background = None
        self.raw_headers = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _until_disconnect(receive, self._send_completion(send))

    async def _send_completion(self, send: Send) -> None:
        try:
            body = await complete_run(
                self.run,
                model=self.model,
                progress=self.progress,
                request_timeout=self.request_timeout,
                trace=self.trace,
            )
        except APIError as error:
            await _send_error(send, error)
            return
        await _send_json(send, 200, body)


async def _send_json(
    send: Send, status: int, body: bytes, headers: Mapping[str, str] | None = None
) -> None:
    raw_headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()),
    ]
    try:
        await send({"type": "http.response.start", "status": status, "headers": raw_headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})
    except OSError:
        pass  # the client is gone; there is no one left to answer


async def _send_error(send: Send, error: APIError) -> None:
    await _send_json(send, error.status, error.body(), error.headers)


def sse_response(
    run: MoARun,
    *,
    model: str,
    include_usage: bool = False,
    progress: bool = False,
    request_timeout: float | None = None,
    headers: Mapping[str, str] | None = None,
) -> SSEResponse:
    """The :class:`SSEResponse` for ``run``: return it from an endpoint."""
    return SSEResponse(
        run,
        model=model,
        include_usage=include_usage,
        progress=progress,
        request_timeout=request_timeout,
        headers=headers,
    )


def moa_router(
    moas: Runtime | Mapping[str, MoA],
    *,
    descriptions: Mapping[str, str] | None = None,
    request_timeout: float | None = None,
    max_body_bytes: int | None = None,
    **router_options: Any,
) -> APIRouter:
    """An ``APIRouter`` serving ``moas`` (a :class:`~moa_stream.config.Runtime`, or MoAs by
    model id) as OpenAI-compatible models.

    A runtime may be started after the router is made, in the application's lifespan; until
    then chat requests get 503 ``not_ready``.

    Routes: ``POST /v1/chat/completions`` (streamed with ``"stream": true``, the server's
    ``X-MoA-Progress`` header and ``moa_stream.progress`` field included) and ``GET /v1/models``,
    ``GET /v1/models/{model_id}``. Every error has OpenAI's ``{"error": {...}}`` body.
    ``request_timeout`` (seconds, 504 past it) and ``max_body_bytes`` (413) default to the
    runtime's ``[server]`` table, or 600 s and 1 MiB. ``router_options`` go to ``APIRouter``
    (``tags``, ``dependencies`` ...).
    """
    ids: list[str] | None = None
    if isinstance(moas, Runtime):
        # The runtime may start later (in the application's lifespan): its MoAs are looked up
        # per request, and its config already names them.
        server = moas.config.server
        ids = list(moas.config.moas)
        descriptions = descriptions or {k: m.description for k, m in moas.config.moas.items()}
        timeout = server.request_timeout if request_timeout is None else request_timeout
        limit = server.max_body_bytes if max_body_bytes is None else max_body_bytes
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
    )

    async def chat_completions(request: Request) -> Response:
        """OpenAI-compatible chat completions answered by a Mixture-of-Agents."""
        try:
            length = request.headers.get("content-length")
            endpoints.check_length(int(length) if length and length.isdigit() else None)
            raw = bytearray()
            async for piece in request.stream():
                raw += piece
                if len(raw) > endpoints.max_body_bytes:
                    raise APIError.body_too_large(endpoints.max_body_bytes)
            req, run, progress, trace = endpoints.open(
                bytes(raw), progress_header=request.headers.get(PROGRESS_HEADER)
            )
        except APIError as error:
            return _error_response(error)
        if req.stream:
            return SSEResponse(
                run,
                model=req.model,
                include_usage=req.include_usage,
                progress=progress,
                request_timeout=endpoints.request_timeout,
                trace=trace,
            )
        return _CompletionResponse(
            run,
            model=req.model,
            progress=progress,
            request_timeout=endpoints.request_timeout,
            trace=trace,
        )

    async def list_models() -> Response:
        """The MoAs, one model object each."""
        return Response(endpoints.models_body, media_type=_JSON)

    async def get_model(model_id: str) -> Response:
        """One MoA's model object."""
        try:
            return Response(endpoints.model_body(model_id), media_type=_JSON)
        except APIError as error:
            return _error_response(error)

    router = APIRouter(**router_options)
    router.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    router.add_api_route("/v1/models", list_models, methods=["GET"])
    router.add_api_route("/v1/models/{model_id}", get_model, methods=["GET"])
    return router
