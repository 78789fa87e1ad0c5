"""What the commands that run a config's MoAs (``demo``, ``chat``, ``serve``) share: their
``--config`` and ``--check`` options, and the exit codes a library error ends them with."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from moa_stream._exceptions import ConfigError, MoAStreamError

__all__ = ["add_config_arguments", "exit_on_error"]


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
