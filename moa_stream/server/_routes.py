"""The server's small routes: health, readiness, metrics and the model list.

Each answers from the server's state (:class:`~moa_stream.server.app.MoAServer`) alone, with
bodies built once where they never change.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import orjson
from aiohttp import web

from moa_stream.server.errors import APIError
from moa_stream.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

if TYPE_CHECKING:
    from moa_stream.server.app import MoAServer

__all__ = ["InfoRoutes"]

_JSON = "application/json"

#: An aiohttp route's ``Expect`` handler.
ExpectHandler = Callable[[web.Request], Awaitable[web.StreamResponse | None]]


class InfoRoutes:
    """``/healthz``, ``/readyz``, ``/metrics`` and ``/v1/models`` of one server."""

    def __init__(self, state: MoAServer) -> None:
        self.state = state
        self._models_body = orjson.dumps(
            {"object": "list", "data": list(state.model_objects.values())}
        )

    def add_to(self, router: web.UrlDispatcher, expect: ExpectHandler) -> None:
        """Add the routes to ``router``, each with the server's ``Expect`` handler."""
        router.add_get("/v1/models", self.list_models, expect_handler=expect)
        router.add_get("/v1/models/{model}", self.get_model, expect_handler=expect)
        router.add_get("/healthz", self.healthz, expect_handler=expect)
        router.add_get("/readyz", self.readyz, expect_handler=expect)
        router.add_get("/metrics", self.metrics, expect_handler=expect)

    async def healthz(self, request: web.Request) -> web.Response:
        """``GET /healthz``: 200 while serving, 503 while draining (load balancers move on)."""
        if self.state.shutting_down:
            return web.Response(status=503, body=b'{"status":"shutting_down"}', content_type=_JSON)
        return web.Response(body=b'{"status":"ok"}', content_type=_JSON)

    async def readyz(self, request: web.Request) -> web.Response:
        """``GET /readyz``: 200 when requests are welcome; 503 once the server drains, so that
        a load balancer sends them elsewhere. (While it starts, :func:`~moa_stream.server.serve`
        answers 503 ``starting`` itself: this application exists once its runtime does.)"""
        if self.state.draining:
            return web.Response(status=503, body=b'{"status":"draining"}', content_type=_JSON)
        return web.Response(body=b'{"status":"ready"}', content_type=_JSON)

    async def metrics(self, request: web.Request) -> web.Response:
        """``GET /metrics``: the Prometheus text of the server's metrics."""
        response = web.Response(body=self.state.metrics.render())
        response.headers["Content-Type"] = METRICS_CONTENT_TYPE
        return response

    async def list_models(self, request: web.Request) -> web.Response:
        """``GET /v1/models``: one model object per MoA id (built once)."""
        return web.Response(body=self._models_body, content_type=_JSON)

    async def get_model(self, request: web.Request) -> web.Response:
        """``GET /v1/models/{id}``: one MoA's model object, or 404."""
        model_id = request.match_info["model"]
        obj = self.state.model_objects.get(model_id)
        if obj is None:
            raise APIError.model_not_found(model_id, list(self.state.moas))
        return web.Response(body=orjson.dumps(obj), content_type=_JSON)
