"""``moa-stream serve``: the OpenAI-compatible MoA server.

Without ``--config`` it serves the embedded default config, whose agents are simulated models
started in-process, so it works with no API key and no network. Logs are JSON lines on stderr;
the first one, ``server.listening``, carries the URL.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
from dataclasses import replace

from moa_stream import _aio
from moa_stream._exceptions import ConfigError
from moa_stream._probe import check_at_start
from moa_stream.cli._common import add_config_arguments
from moa_stream.cli.logs import configure_from_args, format_from_args, level_from_args
from moa_stream.config import Config, default_config, load_config
from moa_stream.server._serve import _url, reserve_port, serve, supervise, worker_argv

__all__ = ["API_KEY_ENV", "add_parser", "run"]

#: An API key the server requires, besides those of the config.
API_KEY_ENV = "MOA_STREAM_API_KEY"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the ``serve`` sub-command."""
    parser = sub.add_parser(
        "serve",
        help="serve MoAs as models of an OpenAI-compatible API",
        description=__doc__,
    )
    add_config_arguments(parser, check_when=", before listening")
    parser.add_argument("--host", help="address to bind (default: [server] host, 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, help="port; 0 picks a free one (default: [server] port, 8080)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="processes sharing the port (SO_REUSEPORT), each with its own runtime (default: 1)",
    )
    parser.add_argument(
        "--drain-delay",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="after SIGTERM, go on serving this long with /readyz answering 503 before the "
        "listening socket closes, so that a load balancer's health checks take the server "
        "out first (default: 0)",
    )
    parser.add_argument(
        "--no-ui",
        action="store_true",
        help="do not serve the playground page at / (same as [server] ui = false)",
    )
    parser.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="let web pages from ORIGIN (e.g. http://localhost:3000, or *) call the API; "
        "repeatable; adds to [server] cors_origins",
    )
    parser.add_argument(
        "--api-key",
        metavar="KEY",
        help=f"require 'Authorization: Bearer KEY' on /v1/*; adds to [server] api_keys. "
        f"Prefer the {API_KEY_ENV} variable: a command line is visible to other users",
    )
    # Set by the supervisor on the workers it starts.
    parser.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--metrics-dir", help=argparse.SUPPRESS)
    parser.set_defaults(func=run)


def _secrets(config: Config) -> list[str]:
    keys = list(config.server.resolved_api_keys())
    for p in config.providers.values():
        if p.api_key:
            keys.append(p.api_key)
        if p.api_key_env and os.environ.get(p.api_key_env):
            keys.append(os.environ[p.api_key_env])
    return keys


def _fail(message: str, code: int) -> int:
    sys.stderr.write(f"moa-stream serve: error: {message}\n")
    return code


def _with_flags(config: Config, args: argparse.Namespace) -> Config:
    """``config`` with the keys and origins given on the command line or in the environment."""
    server = config.server
    keys = [k for k in (args.api_key, os.environ.get(API_KEY_ENV, "").strip()) if k]
    origins = [o for o in args.cors_origin if o not in server.cors_origins]
    if not keys and not origins:
        return config
    server = replace(
        server,
        api_keys=(*server.api_keys, *keys),
        cors_origins=(*server.cors_origins, *origins),
    )
    return replace(config, server=server)


def _announce(url: str, config: Config) -> None:
    # The one line for a person at a terminal; the JSON log line server.listening has it too.
    models = ", ".join(config.moas)
    sys.stderr.write(f"moa-stream serve: listening on {url} (models: {models}); Ctrl-C to stop\n")
    sys.stderr.flush()


async def _announce_when_listening(host: str, port: int, config: Config, within: float) -> None:
    """Print the listening line once a worker accepts connections on the shared port."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline:
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            await asyncio.sleep(0.1)
            continue
        writer.close()
        _announce(_url(host, port), config)
        return


async def _supervise_and_announce(
    argv: list[str], workers: int, host: str, port: int, config: Config
) -> int:
    announce = asyncio.ensure_future(_announce_when_listening(host, port, config, 60.0))
    try:
        return await supervise(argv, workers)
    finally:
        announce.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await announce


def run(args: argparse.Namespace) -> int:
    """Serve as ``args`` say; the exit code (2 for a configuration error)."""
    try:
        config = load_config(args.config) if args.config else default_config()
    except ConfigError as exc:
        return _fail(str(exc), 2)
    if args.workers < 1:
        return _fail("--workers must be at least 1", 2)
    if args.port is not None and not 0 <= args.port <= 65535:
        return _fail("--port must be between 0 and 65535", 2)
    if not 0 <= args.drain_delay < float("inf"):
        return _fail("--drain-delay must be a number of seconds, 0 or more", 2)
    if args.no_ui:
        config = replace(config, server=replace(config.server, ui=False))
    config = _with_flags(config, args)
    configure_from_args(args, secrets=_secrets(config))
    host = config.server.host if args.host is None else args.host
    port = config.server.port if args.port is None else args.port
    # Once, before listening: a wrong base_url or model otherwise shows only per request. The
    # workers a supervisor starts leave it to the supervisor.
    if not args.reuse_port and not _aio.run(check_at_start(config, "serve", fatal=args.check)):
        return 1

    if args.workers > 1:
        try:
            # Bound here, so that every worker gets the same port even when 0 asked for any.
            reserved = reserve_port(host, port)
        except OSError as exc:
            return _fail(f"cannot bind {host}:{port}: {exc.strerror or exc}", 1)
        # Where the workers add up their metrics, so any one's /metrics shows them all.
        metrics_dir = tempfile.mkdtemp(prefix="moa-stream-metrics-")
        try:
            port = reserved.getsockname()[1]
            options = ["--host", host, "--port", str(port), "--metrics-dir", metrics_dir]
            options += ["--workers", "1", "--reuse-port", "--log-level", level_from_args(args)]
            options += ["--log-format", format_from_args(args)]
            options += ["--drain-delay", repr(args.drain_delay)]
            for origin in args.cors_origin:
                options += ["--cors-origin", origin]
            if args.config:
                options += ["--config", args.config]
            if args.no_ui:
                options.append("--no-ui")
            if args.api_key:
                # To the workers through the environment, not their command lines.
                os.environ[API_KEY_ENV] = args.api_key
            return _aio.run(
                _supervise_and_announce(worker_argv(options), args.workers, host, port, config)
            )
        finally:
            reserved.close()
            shutil.rmtree(metrics_dir, ignore_errors=True)

    def on_ready(url: str) -> None:
        if not args.reuse_port:  # a worker: its supervisor announces the server
            _announce(url, config)

    try:
        _aio.run(
            serve(
                config,
                host=host,
                port=port,
                reuse_port=args.reuse_port,
                on_ready=on_ready,
                metrics_dir=args.metrics_dir,
                drain_delay=args.drain_delay,
            )
        )
    except ConfigError as exc:
        return _fail(str(exc), 2)
    except OSError as exc:
        return _fail(f"cannot serve on {host}:{port}: {exc.strerror or exc}", 1)
    return 0
