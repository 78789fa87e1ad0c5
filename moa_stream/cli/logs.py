"""The logging options of the ``moa-stream`` commands: every log line goes to stderr.

The commands are applications, so they configure logging (the library never does), once,
before they start: stdout then carries only a command's output (an answer, a JSON report, a
URL) and can be piped or redirected without log lines in it. The set-up itself is the
library's (:func:`moa_stream._log_setup.configure_logging`), the same one a server started
from an application uses; this module turns the command line into its arguments.

Every command takes the same options:

- ``-v`` (info) and ``-vv`` (debug), or ``--log-level debug|info|warning|error``; the default
  is ``warning`` for the interactive commands and ``info`` for ``serve``;
- ``--log-format console|json``: readable lines on a terminal, one JSON object per line
  otherwise (the default picks by whether stderr is a terminal).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterable
from typing import Any, TextIO

from moa_stream._log_setup import FORMATS, LEVELS, configure_logging

__all__ = [
    "add_logging_arguments",
    "configure_from_args",
    "format_from_args",
    "level_from_args",
]


def add_logging_arguments(parser: argparse.ArgumentParser, default_level: str) -> None:
    """Add ``-v``, ``--log-level`` and ``--log-format`` to ``parser``, except any it has."""
    group = parser.add_argument_group("logging (always on stderr)")
    options: list[tuple[tuple[str, ...], dict[str, Any]]] = [
        (
            ("-v", "--verbose"),
            {"action": "count", "default": 0, "help": "more log lines: -v info, -vv debug"},
        ),
        (
            ("--log-level",),
            {
                "choices": list(LEVELS),
                "default": None,
                "help": f"the lowest level logged (default: {default_level})",
            },
        ),
        (
            ("--log-format",),
            {
                "choices": FORMATS,
                "default": None,
                "help": "console or JSON lines (default: console on a terminal, else JSON)",
            },
        ),
    ]
    for flags, kwargs in options:
        # A command that defines one of these itself keeps its own.
        with contextlib.suppress(argparse.ArgumentError):
            group.add_argument(*flags, **kwargs)
    parser.set_defaults(_default_log_level=default_level)


def level_from_args(args: argparse.Namespace) -> str:
    """The level that ``--log-level`` names, else the default lowered once per ``-v``."""
    explicit: str | None = getattr(args, "log_level", None)
    if explicit:
        return explicit
    default: str = getattr(args, "_default_log_level", "warning")
    order = ["error", "warning", "info", "debug"]
    steps = int(getattr(args, "verbose", 0) or 0)
    return order[min(len(order) - 1, order.index(default) + steps)]


def format_from_args(args: argparse.Namespace, stream: TextIO | None = None) -> str:
    """The format that ``--log-format`` names, else ``console`` on a terminal, ``json``
    otherwise."""
    fmt: str | None = getattr(args, "log_format", None)
    if fmt:
        return fmt
    out = stream if stream is not None else sys.stderr
    return "console" if out.isatty() else "json"


def configure_from_args(
    args: argparse.Namespace, *, secrets: Iterable[str] = (), stream: TextIO | None = None
) -> None:
    """Configure logging as the command line ``args`` ask."""
    configure_logging(
        level=level_from_args(args),
        fmt=format_from_args(args, stream),
        stream=stream,
        secrets=secrets,
    )
