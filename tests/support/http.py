"""An aiohttp application served on a free loopback port: the one way the suite runs a test
server (the server under test, scripted upstreams, small stand-ins)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

#: The ``app_server`` fixture: ``url = await app_server(app, **runner_options)``.
AppServer = Callable[..., Awaitable[str]]


@contextlib.asynccontextmanager
async def serve_app(app: web.Application, **options: Any) -> AsyncIterator[str]:
    """Serve ``app`` on 127.0.0.1 and yield its ``http://host:port``.

    ``options`` go to :class:`aiohttp.web.AppRunner`; handler cancellation is on by default,
    as ``moa-stream serve`` runs it, so a handler sees its client leave.
    """
    options.setdefault("handler_cancellation", True)
    runner = web.AppRunner(app, **options)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
