"""``moa-stream serve``: the OpenAI-compatible MoA server.

Without ``--config`` it serves the embedded default config, whose agents are simulated models
started in-process, so it works with no API key and no network. Logs are JSON lines on stderr;
the first one, ``server.listening``, carries the URL.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace

from moa_stream import _aio
from moa_stream._cli_logging import configure_from_args, format_from_args, level_from_args
from moa_stream._exceptions import ConfigError
from moa_stream.config import Config, default_config, load_config
from moa_stream.server._serve import reserve_port, serve, supervise, worker_argv

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the ``serve`` sub-command."""
    parser = sub.add_parser(
        "serve",
        help="serve MoAs as models of an OpenAI-compatible API",
        description=__doc__,
    )
    parser.add_argument(
        "--config", metavar="FILE", help="TOML config (default: the embedded simulated one)"
    )
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
        "--no-ui",
        action="store_true",
        help="do not serve the playground page at / (same as [server] ui = false)",
    )
    # Set by the supervisor on the workers it starts.
    parser.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
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
    if args.no_ui:
        config = replace(config, server=replace(config.server, ui=False))
    configure_from_args(args, secrets=_secrets(config))
    host = config.server.host if args.host is None else args.host
    port = config.server.port if args.port is None else args.port

    if args.workers > 1:
        try:
            # Bound here, so that every worker gets the same port even when 0 asked for any.
            reserved = reserve_port(host, port)
        except OSError as exc:
            return _fail(f"cannot bind {host}:{port}: {exc.strerror or exc}", 1)
        try:
            options = ["--host", host, "--port", str(reserved.getsockname()[1])]
            options += ["--workers", "1", "--reuse-port", "--log-level", level_from_args(args)]
            options += ["--log-format", format_from_args(args)]
            if args.config:
                options += ["--config", args.config]
            if args.no_ui:
                options.append("--no-ui")
            return _aio.run(supervise(worker_argv(options), args.workers))
        finally:
            reserved.close()

    try:
        _aio.run(serve(config, host=host, port=port, reuse_port=args.reuse_port))
    except ConfigError as exc:
        return _fail(str(exc), 2)
    except OSError as exc:
        return _fail(f"cannot serve on {host}:{port}: {exc.strerror or exc}", 1)
    return 0
