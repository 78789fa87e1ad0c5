"""The MoA endpoints inside an existing aiohttp application.

Two pieces:

- :func:`add_moa_subapp` mounts the server's own application (:func:`moa_stream.server.create_app`:
  ``/v1/chat/completions`` streamed and not, ``/v1/models``, ``/healthz``, ``/metrics``, with
  its API keys, limits, error bodies and metrics) under a prefix of your application.
- :func:`sse_response` turns a run you started in your own handler into an OpenAI-compatible
  SSE response.

A client that disconnects cancels its handler, and with it the run and every upstream request
the run has open, when the application runs with ``handler_cancellation=True``
(``web.run_app(app, handler_cancellation=True)`` or ``web.AppRunner(app,
handler_cancellation=True)``). Without it aiohttp lets the handler run on until it next writes.
See ``docs/integrations.md``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

from aiohttp import web

from moa_stream.config import Runtime, ServerConfig
from moa_stream.engine.run import MoARun
from moa_stream.integrations._core import stream_run

# The server's application itself, by its public names: what add_moa_subapp mounts is exactly
# what ``moa-stream serve`` runs.
from moa_stream.server import MoAServer, create_app
from moa_stream.server.errors import APIError
from moa_stream.server.metrics import ServerMetrics
from moa_stream.server.respond import Answer, ChatOptions, ResponseSink, error_parts

__all__ = ["add_moa_subapp", "sse_response"]


def add_moa_subapp(
    parent: web.Application,
    runtime: Runtime,
    *,
    prefix: str = "/moa",
    server_config: ServerConfig | None = None,
    metrics: ServerMetrics | None = None,
) -> web.Application:
    """Mount the OpenAI-compatible server for ``runtime``'s MoAs on ``parent`` at ``prefix``.

    ``prefix + "/v1"`` is then the base URL for OpenAI clients. ``runtime`` must be started and
    outlive the application; ``server_config`` defaults to the runtime's ``[server]`` table
    (API keys, body and concurrency limits, request timeout). Returns the sub-application;
    ``sub[MoAServer.KEY]`` is its state (metrics, active requests, shutdown).

    aiohttp reads bodies with the parent's ``client_max_size``: make it at least
    ``max_body_bytes`` when that is above aiohttp's default of 1 MiB.
    """
    prefix = prefix.rstrip("/")
    if not prefix.startswith("/"):
        raise ValueError(f"prefix must start with '/', got {prefix!r}")
    sub = create_app(runtime, server_config, metrics=metrics)
    # The server's middleware recognises its paths (authentication on /v1/*, chat metrics)
    # relative to where it is mounted.
    sub[MoAServer.KEY].path_prefix = prefix
    parent.add_subapp(prefix, sub)
    return sub


async def sse_response(
    request: web.Request,
    run: MoARun,
    *,
    model: str,
    include_usage: bool = False,
    progress: bool = False,
    request_timeout: float | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.StreamResponse:
    """Run ``run`` and answer ``request`` with it as an OpenAI chat-completions stream.

    ``run`` comes from ``moa.stream(messages)`` and must not be entered yet: it is entered and
    closed here. ``model`` is the name the chunks carry. The headers go out with the first
    answer token, so a run that fails before answering is answered with a JSON error and a
    real status (502; 504 past ``request_timeout``); a failure after that ends the stream with
    an error frame and ``[DONE]``. ``progress`` adds the server's ``: moa.progress`` comments.
    The response has its own ``X-Request-Id``, as the server's do; ``headers`` are added to it.
    """
    answer = Answer(model, ChatOptions(progress=progress), include_usage=include_usage)
    response = web.StreamResponse(headers=headers)
    sink = _Sink(request, response, headers or {})
    try:
        await stream_run(run, sink, answer, request_timeout=request_timeout)
    except APIError as error:
        status, error_headers, body = error_parts(error, answer.request_id)
        return web.Response(status=status, body=body, headers=error_headers)
    if response.prepared:
        with contextlib.suppress(ConnectionResetError):
            await response.write_eof()
    return response


class _Sink(ResponseSink):
    """The server's sink, the application's ``headers`` winning over the answer's."""

    __slots__ = ("_extra",)

    def __init__(
        self, request: web.Request, response: web.StreamResponse, extra: Mapping[str, str]
    ) -> None:
        super().__init__(request, response)
        self._extra = extra

    async def start(self, headers: Mapping[str, str]) -> None:
        await super().start({**headers, **self._extra})
