"""``moa-stream sim``: run the simulated upstream until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

from moa_stream import _aio
from moa_stream._exceptions import ConfigError
from moa_stream.sim._config import load_sim_config
from moa_stream.sim.profiles import SimModel, default_models
from moa_stream.sim.server import SimServer

__all__ = ["add_parser", "run"]

DEFAULT_PORT = 8001


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the ``sim`` sub-command."""
    parser = subparsers.add_parser(
        "sim",
        help="run the simulated OpenAI-compatible upstream",
        description=(
            "Serve simulated models over the OpenAI chat-completions protocol. Prints the base "
            "URL on its first line of output, then runs until SIGINT or SIGTERM."
        ),
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: %(default)s)"
    )
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help="port; 0 picks a free one (default: %(default)s)",
    )
    parser.add_argument(
        "--config", metavar="FILE", help="TOML file of models (default: the built-in model set)"
    )
    parser.add_argument("--seed", type=int, help="seed for text, timing and faults (default: 0)")
    parser.add_argument(
        "--records-maxlen",
        type=int,
        default=10_000,
        help="request records kept in memory (default: %(default)s)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the server as ``args`` say; the exit code."""
    models: list[SimModel] = default_models()
    seed = 0
    if args.config:
        try:
            settings = load_sim_config(args.config)
        except ConfigError as exc:
            sys.stderr.write(f"moa-stream sim: error: {exc}\n")
            return 2
        models = settings.models
        seed = settings.seed if settings.seed is not None else 0
    if args.seed is not None:
        seed = args.seed
    try:
        return _aio.run(_serve(models, seed, args.host, args.port, args.records_maxlen))
    except OSError as exc:
        sys.stderr.write(
            f"moa-stream sim: error: cannot listen on {args.host}:{args.port}: {exc}\n"
        )
        return 1


async def _serve(models: list[SimModel], seed: int, host: str, port: int, maxlen: int) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        # Not available on Windows' event loop; Ctrl-C still ends the process there.
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    async with SimServer(models, seed=seed, host=host, port=port, records_maxlen=maxlen) as sim:
        names = ", ".join(sim.models)
        # The first line names the URL so a parent process can read the port it got.
        sys.stdout.write(f"moa-stream sim: serving {names} at {sim.base_url}\n")
        sys.stdout.flush()
        await stop.wait()
    return 0
