"""Running the server: one process (:func:`serve`) or several on one port (:func:`supervise`).

Start: the socket listens first, and until the runtime has started (the providers' connection
pools, the in-process simulator of the embedded default) a placeholder answers: ``/healthz``
200 (the process is alive), ``/readyz`` 503 ``starting``, anything else 503 ``starting``. Then
the server's own application takes over the socket and ``/readyz`` answers 200.

Shutdown, on SIGTERM or SIGINT:

0. ``/readyz`` answers 503 at once and every response closes its connection, but requests are
   still served for ``drain_delay`` seconds (``--drain-delay``; default 0), the time a load
   balancer's health checks need to take this instance out;
1. the listening socket closes (new connections are refused; a load balancer moves on) and
   ``/healthz`` answers 503, new requests on open keep-alive connections get 503;
2. requests in flight go on for up to ``shutdown_grace`` seconds;
3. those still running then end: a stream gets a ``shutting_down`` error frame and ``[DONE]``,
   a non-streamed request a 503; aiohttp cancels whatever has not ended a second later;
4. the runtime (providers, the in-process simulator) closes and the process exits 0.

A second signal skips the rest of the drain delay and of the grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace

import structlog
from aiohttp import web

from moa_stream._wire import retry_after_headers
from moa_stream.config import Config, Runtime, ServerConfig
from moa_stream.server._shared_metrics import SharedMetrics
from moa_stream.server.app import MoAServer, build_app
from moa_stream.server.errors import APIError
from moa_stream.server.metrics import ServerMetrics

__all__ = ["listen", "reserve_port", "serve", "supervise", "worker_argv"]

log = structlog.get_logger("moa_stream.server")

#: After the grace period, how long ended requests get to write their last frame before
#: aiohttp cancels them.
_AFTER_GRACE = 1.0


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


_STARTING = APIError(
    503,
    "The server is starting. Retry in a moment, or on another instance.",
    error_type="server_error",
    code="starting",
    outcome="starting",
    headers=retry_after_headers(1),
)


async def _starting(request: web.Request) -> web.Response:
    """Every answer of the placeholder that listens while the runtime starts."""
    path = request.path
    if path == "/healthz":
        response = web.json_response({"status": "ok"})
    elif path == "/readyz":
        response = web.json_response({"status": "starting"}, status=503)
    else:
        response = _STARTING.response()
    # Not kept alive: the connection's next request should reach the server itself.
    response.force_close()
    return response


def _starting_app() -> web.Application:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", _starting)
    return app


class _Switch:
    """A protocol factory for ``loop.create_server`` that makes whatever :attr:`factory`
    makes now: the placeholder's connections while starting, the server's afterwards."""

    __slots__ = ("factory",)

    def __init__(self, factory: Callable[[], asyncio.BaseProtocol]) -> None:
        self.factory = factory

    def __call__(self) -> asyncio.BaseProtocol:
        return self.factory()


async def serve(
    config: Config,
    *,
    host: str | None = None,
    port: int | None = None,
    reuse_port: bool = False,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[str], None] | None = None,
    metrics_dir: str | None = None,
    drain_delay: float = 0.0,
) -> None:
    """Serve ``config``'s MoAs until SIGTERM or SIGINT (or until ``stop`` is set).

    ``host``/``port`` override the ``[server]`` table; ``reuse_port`` binds with
    ``SO_REUSEPORT`` so that several processes share the port. ``on_ready`` is called with the
    base URL once the socket listens (the port is the real one when 0 was asked for).
    ``metrics_dir`` is the directory where the workers of one server share their metrics
    (see ``_shared_metrics``). ``drain_delay`` is how long requests are still served, with
    ``/readyz`` answering 503, between the signal and the closing of the listening socket.
    """
    settings = config.server
    settings = replace(
        settings,
        host=settings.host if host is None else host,
        port=settings.port if port is None else port,
    )
    stop = stop if stop is not None else asyncio.Event()
    force = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set():
            force.set()
        stop.set()

    installed = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, on_signal)
            installed.append(sig)
    try:
        starting = web.AppRunner(_starting_app(), access_log=None, shutdown_timeout=_AFTER_GRACE)
        await starting.setup()
        assert starting.server is not None
        switch = _Switch(starting.server)
        listener: asyncio.Server | None = None
        try:
            listener = await _create_server(switch, settings.host, settings.port, reuse_port)
            async with Runtime(config) as runtime:
                await _run(
                    config, runtime, settings, listener, switch, starting,
                    stop=stop, force=force, on_ready=on_ready, metrics_dir=metrics_dir,
                    drain_delay=drain_delay,
                )  # fmt: skip
        finally:
            if listener is not None:
                listener.close()
            await starting.cleanup()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
    log.info("server.stopped", pid=os.getpid())


async def _run(
    config: Config,
    runtime: Runtime,
    settings: ServerConfig,
    listener: asyncio.Server,
    switch: _Switch,
    starting: web.AppRunner,
    *,
    stop: asyncio.Event,
    force: asyncio.Event,
    on_ready: Callable[[str], None] | None,
    metrics_dir: str | None,
    drain_delay: float,
) -> None:
    """Serve on ``listener`` from a started ``runtime`` until ``stop``, then drain."""
    descriptions = {moa_id: m.description for moa_id, m in config.moas.items()}
    metrics = ServerMetrics()
    flusher: asyncio.Future[None] | None = None
    if metrics_dir is not None:
        metrics.shared = SharedMetrics(metrics_dir, metrics.registry)
        metrics.shared.write()
        flusher = asyncio.ensure_future(metrics.shared.run())
    state = MoAServer(runtime.moas, settings, descriptions=descriptions, metrics=metrics)
    runner = web.AppRunner(
        build_app(state),
        handler_cancellation=True,
        access_log=None,  # one structured line per request is written by the app
        shutdown_timeout=_AFTER_GRACE,
    )
    await runner.setup()
    try:
        # From here on, new connections reach the server; the placeholder's close after
        # their one response.
        switch.factory = _protocol_factory(state, runner)
        await starting.cleanup()
        bound = listener.sockets[0].getsockname()
        url = _url(settings.host, int(bound[1]))
        log.info(
            "server.listening",
            url=url,
            models=list(runtime.moas),
            pid=os.getpid(),
            auth=bool(settings.resolved_api_keys()),
        )
        if on_ready is not None:
            on_ready(url)
        await stop.wait()
        state.begin_drain()
        if drain_delay > 0 and not force.is_set():
            log.info("server.draining", in_flight=state.active, delay_s=drain_delay)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(drain_delay):
                    await force.wait()
        log.info("server.stopping", in_flight=state.active, grace_s=settings.shutdown_grace)
        state.begin_shutdown()
        # Closes the listening socket now; open connections are runner.cleanup()'s.
        listener.close()
        drained = await _drain(state, settings.shutdown_grace, force)
        if not drained:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_AFTER_GRACE):
                    await state.wait_idle()
    finally:
        listener.close()
        await runner.cleanup()
        if flusher is not None:
            flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flusher


async def _drain(state: MoAServer, grace: float, force: asyncio.Event) -> bool:
    drain = asyncio.ensure_future(state.drain(grace))
    forced = asyncio.ensure_future(force.wait())
    try:
        await asyncio.wait((drain, forced), return_when=asyncio.FIRST_COMPLETED)
    finally:
        forced.cancel()
    if drain.done():
        return drain.result()
    drain.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await drain
    return await state.drain(0)


async def listen(
    state: MoAServer, runner: web.AppRunner, host: str, port: int, reuse_port: bool = False
) -> asyncio.Server:
    """Accept connections for ``runner`` (set up) on ``host:port``, each through the
    connection cap and the header deadline of ``state`` (see ``_connections``)."""
    return await _create_server(_protocol_factory(state, runner), host, port, reuse_port)


def _protocol_factory(state: MoAServer, runner: web.AppRunner) -> Callable[[], asyncio.Protocol]:
    server = runner.server
    if server is None:
        raise RuntimeError("call runner.setup() first")
    return state.connections.protocol_factory(
        server,
        keepalive_timeout=state.config.keepalive_timeout,
        # After an error response, aiohttp reads what is left of an unread body for this long
        # (default 10 s) before closing; a client whose body stalled would hold it that long.
        lingering_time=1.0,
        access_log=None,  # one structured line per request is written by the app
    )


async def _create_server(
    factory: Callable[[], asyncio.BaseProtocol], host: str, port: int, reuse_port: bool
) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        factory,
        host,
        port,
        reuse_port=reuse_port or None,
        backlog=1024,
    )


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` with ``SO_REUSEPORT`` but not listening.

    Keeps a port picked by the system (``port=0``) for workers to bind with ``SO_REUSEPORT``;
    Linux sends connections only to listening sockets, so this one never gets any.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


async def supervise(worker_argv: Sequence[str], workers: int) -> int:
    """Run ``workers`` copies of ``worker_argv`` and pass SIGTERM/SIGINT on to them.

    Returns 0 when every worker exited 0 after a signal. If a worker exits on its own, the
    others are stopped and its exit code (or 1) is returned: a half-running server would hide
    the failure.
    """
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    procs = []
    try:
        for _ in range(workers):
            # A session of their own: a terminal's Ctrl-C reaches only this process, which
            # passes it on once. Reaching the workers twice would skip their grace period.
            procs.append(await asyncio.create_subprocess_exec(*worker_argv, start_new_session=True))
    except BaseException:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.terminate()
        raise

    def forward(sig: signal.Signals) -> None:
        stopping.set()
        for p in procs:
            if p.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(sig)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, forward, sig)
    try:
        waits = {asyncio.ensure_future(p.wait()): p for p in procs}
        first_failure: int | None = None
        pending = set(waits)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for fut in done:
                code = fut.result()
                if not stopping.is_set():
                    # A worker died on its own: stop the rest rather than serve at reduced size.
                    first_failure = code or 1
                    forward(signal.SIGTERM)
                elif code != 0 and first_failure is None:
                    first_failure = code
        return first_failure or 0
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def worker_argv(args: Sequence[str]) -> list[str]:
    """The command line that runs one worker with ``args`` (serve's own options)."""
    return [sys.executable, "-m", "moa_stream.cli", "serve", *args]
