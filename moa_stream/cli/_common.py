"""What the commands that run a config's MoAs (``demo``, ``chat``, ``serve``) share: their
``--config`` and ``--check`` options, the exit codes a library error ends them with, and (for
``demo`` and ``chat``) a parser described by the module's docstring."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from moa_stream._exceptions import ConfigError, MoAStreamError

__all__ = ["add_config_arguments", "add_documented_command", "exit_on_error"]


def add_documented_command(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    summary: str,
    doc: str | None,
) -> argparse.ArgumentParser:
    """The parser of sub-command ``name``: ``summary`` in the command list, and ``doc`` (the
    command module's docstring) as its description, its paragraphs and lists kept as written."""
    return sub.add_parser(
        name,
        help=summary,
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_config_arguments(parser: argparse.ArgumentParser, *, check_when: str = "") -> None:
    """``--config FILE`` and ``--check``; ``check_when`` says when the check runs, if the
    command has a moment worth naming (``", before listening"``)."""
    parser.add_argument(
        "--config", metavar="FILE", help="a TOML config (default: the embedded simulated one)"
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help=f"exit 1 when a provider is unreachable or lacks a model{check_when} "
        "(default: a warning)",
    )


def exit_on_error(command: str, work: Callable[[], int]) -> int:
    """``work()``'s exit code; a library error instead becomes one line on stderr and exit 1,
    a configuration error exit 2, so that a script can tell them apart."""
    try:
        return work()
    except MoAStreamError as exc:
        sys.stderr.write(f"moa-stream {command}: error: {exc}\n")
        return 2 if isinstance(exc, ConfigError) else 1
