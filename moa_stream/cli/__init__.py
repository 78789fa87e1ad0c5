"""The ``moa-stream`` command.

Each sub-command registers itself through a module-level ``add_parser(subparsers)`` that sets
``func`` (``args -> exit code``) on its parser: ``demo``, ``chat`` and ``serve`` live in this
package, ``sim`` and ``bench`` next to the code they drive. This module adds what every command
shares: ``--version``, the logging options (logs always go to stderr, see
:mod:`moa_stream.cli.logs`) and help texts in plain text. Nothing else in the library imports
this package: the command line sits on top of it.
"""

from __future__ import annotations

import argparse
import importlib
import re
from collections.abc import Callable, Sequence
from typing import cast

from moa_stream import __version__
from moa_stream.cli.logs import add_logging_arguments, configure_from_args

__all__ = ["build_parser", "main"]

#: sub-command name -> module that defines ``add_parser``
COMMANDS: dict[str, str] = {
    "demo": "moa_stream.cli.demo",
    "chat": "moa_stream.cli.chat",
    "sim": "moa_stream.sim._cli",
    "serve": "moa_stream.cli.serve",
    "bench": "moa_stream.bench._cli",
}

#: the default log level per command; the rest log warnings and errors only
DEFAULT_LOG_LEVELS = {"serve": "info", "sim": "info"}

_ROLE = re.compile(r":[a-z]+:`~?([^`]+)`")


def plain_text(text: str) -> str:
    """Help text without reStructuredText markup: a module docstring reused as a command's
    description reads as plain prose in a terminal."""
    text = _ROLE.sub(lambda m: m.group(1).rsplit(".", 1)[-1], text)
    text = text.replace("``", "")
    return re.sub(r"::\n", ":\n", text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moa-stream",
        description="Mixture-of-Agents over OpenAI-compatible providers, streamed with low TTFT.",
    )
    parser.add_argument("--version", action="version", version=f"moa-stream {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in dict.fromkeys(COMMANDS.values()):
        module = importlib.import_module(module_name)
        add = cast(
            "Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]",
            module.add_parser,
        )
        add(sub)
    for name, command in sub.choices.items():
        if command.description:
            command.description = plain_text(command.description)
        add_logging_arguments(command, DEFAULT_LOG_LEVELS.get(name, "warning"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_from_args(args)
    func = cast(Callable[[argparse.Namespace], int], args.func)
    try:
        return func(args)
    except KeyboardInterrupt:
        return 130
