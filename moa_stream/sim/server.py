"""The simulated upstream: a real aiohttp server speaking OpenAI chat completions (and
Anthropic Messages).

One process hosts any number of named :class:`~moa_stream.sim.profiles.SimModel`. Each request
is planned up front (:mod:`moa_stream.sim._plan`): its text, the absolute time of every token
and any fault. The handler then only sleeps until the next due time and writes every chunk due
by then in one ``write`` (:mod:`moa_stream.sim._pacing`), so timing does not drift and
per-chunk work stays tiny under load. What happened to each request is kept in its
:class:`SimRecord` (:mod:`moa_stream.sim._ledger`); the routes (:mod:`moa_stream.sim._openai`,
:mod:`moa_stream.sim._anthropic`) only speak their wire formats.

All timestamps are ``time.monotonic()`` (CLOCK_MONOTONIC, shared by every process on the
machine), so a benchmark in another process can compare them with its own.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from types import MappingProxyType
from typing import Literal

from aiohttp import web

from moa_stream._exceptions import ConfigError
from moa_stream._resource import AsyncResource
from moa_stream.sim._anthropic import MessagesRoute
from moa_stream.sim._ledger import Ledger, Outcome, SimRecord
from moa_stream.sim._openai import OpenAIRoutes, add_request_id, openai_errors
from moa_stream.sim._pacing import Pacer
from moa_stream.sim.profiles import SimModel, default_models

__all__ = ["Outcome", "SimRecord", "SimServer"]


class SimServer(AsyncResource):
    """A simulated OpenAI-compatible upstream hosting ``models`` (default:
    :func:`~moa_stream.sim.profiles.default_models`).

    Use it as an async context manager, or call :meth:`start` and :meth:`aclose` (both
    idempotent). ``port=0`` picks a free port; read :attr:`base_url` after starting.
    ``seed`` makes text, timing and faults reproducible. ``records_maxlen`` bounds
    :attr:`records` (oldest dropped first; None keeps everything).

    Closing does not wait for streams in progress: they are cut off and recorded as ``"error"``.
    """

    def __init__(
        self,
        models: Iterable[SimModel] | None = None,
        *,
        seed: int = 0,
        host: str = "127.0.0.1",
        port: int = 0,
        records_maxlen: int | None = 10_000,
        created: int | None = None,
    ) -> None:
        self._state: Literal["new", "running", "closed"] = "new"
        self._pacer = Pacer()
        self._models: dict[str, SimModel] = {}
        for model in default_models() if models is None else models:
            self.add_model(model)
        self.seed = seed
        self.host = host
        self._port = port
        self._created = int(time.time()) if created is None else created
        self._ledger = Ledger(records_maxlen)
        self._lock = asyncio.Lock()
        self._runner: web.AppRunner | None = None

    # -- public surface -------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound port (the requested one until started)."""
        return self._port

    @property
    def url(self) -> str:
        """``http://host:port``, without the ``/v1`` prefix."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self._port}"

    @property
    def base_url(self) -> str:
        """The OpenAI base URL: ``http://host:port/v1``."""
        return self.url + "/v1"

    @property
    def models(self) -> MappingProxyType[str, SimModel]:
        """The hosted models by name."""
        return MappingProxyType(self._models)

    @property
    def records(self) -> list[SimRecord]:
        """A snapshot of the request records, oldest first (records in progress included)."""
        return self._ledger.records

    @property
    def active_streams(self) -> int:
        """Streaming responses currently being written."""
        return self._ledger.active_streams

    @property
    def in_flight(self) -> int:
        """Requests whose handler has not finished."""
        return self._ledger.in_flight

    @property
    def open_connections(self) -> int:
        """TCP connections currently open to the server."""
        server = None if self._runner is None else self._runner.server
        return 0 if server is None else len(server.connections)

    def add_model(self, model: SimModel) -> None:
        """Host another model (also while running)."""
        if model.name in self._models:
            raise ConfigError(f"duplicate model name {model.name!r}", path="sim.models")
        self._models[model.name] = model
        if self._state == "running":
            self._pacer.add(model)

    def clear_records(self) -> None:
        """Forget all records."""
        self._ledger.clear()

    # The timeout is part of this helper's contract: tests call it bare and expect it to end.
    async def wait_idle(
        self,
        timeout: float = 5.0,  # noqa: ASYNC109
        *,
        connections: bool = False,
    ) -> None:
        """Wait until no request is being handled (clients that went away included), and with
        ``connections=True`` also until every connection is closed. ``TimeoutError`` after
        ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            await self._ledger.wait_idle()
            # aiohttp signals no event when a connection closes, so poll briefly.
            while connections and self.open_connections:  # noqa: ASYNC110
                await asyncio.sleep(0.005)

    def make_app(self) -> web.Application:
        """The aiohttp application (for embedding in another runner)."""
        openai = OpenAIRoutes(self, self._ledger, self._pacer, self._created)
        messages = MessagesRoute(self, self._ledger, self._pacer)
        app = web.Application(middlewares=[openai_errors], client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", openai.chat)
        app.router.add_post("/v1/messages", messages.handle)
        app.router.add_get("/v1/models", openai.models)
        app.router.add_get("/v1/models/{model}", openai.model)
        app.router.add_get("/health", openai.health)
        app.on_response_prepare.append(add_request_id)
        return app

    async def start(self) -> SimServer:
        """Bind and start serving. Idempotent; a closed server cannot be restarted."""
        async with self._lock:
            if self._state == "running":
                return self
            if self._state == "closed":
                raise RuntimeError("SimServer is closed")
            self._pacer.start(self._models.values())
            # handler_cancellation: a client that goes away cancels its handler at once, even
            # while it sleeps before the next token. No access log: it costs time under load.
            runner = web.AppRunner(
                self.make_app(), handler_cancellation=True, access_log=None, shutdown_timeout=1.0
            )
            await runner.setup()
            try:
                # A deep backlog: with the default 128, a benchmark opening 256 connections at
                # once loses SYNs and its clients wait a second to retry.
                site = web.TCPSite(runner, self.host, self._port, backlog=1024)
                await site.start()
            except BaseException:
                await runner.cleanup()
                raise
            self._port = int(runner.addresses[0][1])
            self._runner = runner
            self._state = "running"
            return self

    async def aclose(self) -> None:
        """Stop serving and cut off requests in progress. Idempotent."""
        async with self._lock:
            if self._state == "closed":
                return
            self._state = "closed"
            self._ledger.close()
            runner, self._runner = self._runner, None
            if runner is None:
                return
            # Stop accepting first, then cancel handlers ourselves: aiohttp's own shutdown would
            # wait for them (a stalled stream for its whole stall).
            for site in list(runner.sites):
                await site.stop()
            await self._ledger.cut_off()
            await runner.cleanup()

    async def __aenter__(self) -> SimServer:
        return await self.start()

    def __repr__(self) -> str:
        return f"<SimServer {self.base_url} models={list(self._models)} state={self._state}>"
