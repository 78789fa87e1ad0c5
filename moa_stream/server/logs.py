"""Logging set-up for a server run inside an application: one JSON object per line, on stderr.

The library only ever calls ``structlog.get_logger()``. :func:`configure_logging` here is the
library's logging set-up (:mod:`moa_stream._log_setup`) in its JSON format, the one
``moa-stream serve`` uses too, so a server an application starts itself logs exactly as the
command does: records of the standard ``logging`` module (aiohttp's, asyncio's) go through the
same renderer.

Secrets: request headers are never logged, and the set-up also installs :class:`Redactor`, a
processor that replaces any configured API key found in a log line's values with
``[redacted]`` before the line is rendered, as a second line of defence.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TextIO

from moa_stream import _log_setup
from moa_stream._log_setup import Redactor

__all__ = ["Redactor", "configure_logging"]


def configure_logging(
    *,
    level: str = "info",
    stream: TextIO | None = None,
    secrets: Iterable[str] = (),
) -> None:
    """Send structlog and standard-library logging to ``stream`` (stderr) as JSON lines.

    ``level`` is ``debug``, ``info``, ``warning`` or ``error``; ``secrets`` are masked wherever
    they appear in a line. The set-up is the library's (:mod:`moa_stream._log_setup`) in its
    JSON format, so a server embedded in an application logs exactly as ``moa-stream serve``.
    """
    _log_setup.configure_logging(level=level, fmt="json", stream=stream, secrets=secrets)
