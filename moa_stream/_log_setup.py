"""Logging set-up for an application of the library: every log line goes to one stream.

The library itself never configures logging: it only calls ``structlog.get_logger()`` (and
aiohttp uses the standard ``logging`` module), so an application that imports ``moa_stream``
keeps whatever set-up it has (:mod:`moa_stream._log`). The ``moa-stream`` commands are
applications, and so is a server an application starts itself: :func:`configure_logging` is
their set-up, used by the command line (:mod:`moa_stream.cli.logs`, from its options) and by
:func:`moa_stream.server.configure_logging`. It sends structlog's lines and the standard
library's to stderr (by default), readable on a terminal or one JSON object per line, with
configured secrets masked (:class:`Redactor`).

``demo`` and ``chat`` draw a live status line on the same terminal. Every log line goes
through :class:`_LiveAwareStream`, which asks the live view (:func:`set_live_line`) to erase its
line first and draw it again after, or to hold the log line while an answer streams there:
a warning never lands inside the status line or the answer.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import Any, Protocol, TextIO, cast

import orjson
import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from moa_stream._secrets import mask_secrets

__all__ = [
    "FORMATS",
    "LEVELS",
    "LiveLine",
    "Redactor",
    "configure_logging",
    "release_live_line",
    "set_live_line",
]

LEVELS: dict[str, int] = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
FORMATS = ("console", "json")


class Redactor:
    """A structlog processor that masks every occurrence of the given secrets, and any long
    start of one (a message cut in the middle of a key), in string values (nested dicts and
    lists included)."""

    def __init__(self, secrets: Iterable[str]) -> None:
        # Longest first, so that a key containing another key is masked whole.
        self.secrets = tuple(sorted({s for s in secrets if s}, key=len, reverse=True))

    def _clean(self, value: Any) -> Any:
        if isinstance(value, str):
            return mask_secrets(value, self.secrets, "[redacted]")
        if isinstance(value, dict):
            return {k: self._clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._clean(v) for v in value]
        return value

    def __call__(self, logger: WrappedLogger, method: str, event_dict: EventDict) -> EventDict:
        if not self.secrets:
            return event_dict
        return {k: self._clean(v) for k, v in event_dict.items()}


class LiveLine(Protocol):
    """A live line on the terminal that log lines must not be written into."""

    def before_log(self) -> bool:
        """Erase the line before a log line; False: hold the log line until released."""
        ...

    def after_log(self) -> None:
        """Draw the line again after the log line."""
        ...


_live: LiveLine | None = None
_held: list[tuple[TextIO, str]] = []


def set_live_line(line: LiveLine) -> None:
    """``line`` is now drawn on the terminal (it replaces any earlier one)."""
    global _live
    _live = line


def release_live_line(line: LiveLine) -> None:
    """``line`` is gone: write the log lines held back meanwhile."""
    global _live
    if _live is line:
        _live = None
    held = list(_held)
    _held.clear()
    for stream, text in held:
        stream.write(text)
        stream.flush()


class _LiveAwareStream:
    """The stream log lines are written to: around each write the live line, if any, is
    erased and redrawn (or the write held until the live line is released)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        live = _live
        if live is None:
            return self.stream.write(text)
        if not live.before_log():
            _held.append((self.stream, text))
            return len(text)
        try:
            written = self.stream.write(text)
            self.stream.flush()
        finally:
            live.after_log()
        return written

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()


def _orjson_str(obj: Any, **_: Any) -> str:
    return orjson.dumps(obj, default=str).decode()


def configure_logging(
    *,
    level: str = "warning",
    fmt: str = "json",
    stream: TextIO | None = None,
    secrets: Iterable[str] = (),
) -> None:
    """Send structlog and standard-library logging to ``stream`` (stderr by default).

    ``fmt`` is ``console`` (aligned, coloured on a terminal) or ``json`` (one object per line);
    ``secrets`` are masked wherever they appear in a line.
    """
    if level not in LEVELS:
        raise ValueError(f"unknown log level {level!r}")
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r}")
    out = stream if stream is not None else sys.stderr
    sink = cast(TextIO, _LiveAwareStream(out))
    numeric = LEVELS[level]
    renderer: Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer(serializer=_orjson_str)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty())
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        Redactor(secrets),
    ]
    if fmt == "json":
        shared.insert(3, structlog.processors.format_exc_info)
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.WriteLoggerFactory(sink),
        # Not cached: tests and a second configure() call must see the new set-up.
        cache_logger_on_first_use=False,
    )

    def add_logger_name(logger: WrappedLogger, method: str, event_dict: EventDict) -> EventDict:
        record = event_dict.get("_record")
        if isinstance(record, logging.LogRecord):
            event_dict["logger"] = record.name
        return event_dict

    formatter = structlog.stdlib.ProcessorFormatter(
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        foreign_pre_chain=[add_logger_name, *shared],
    )
    handler = logging.StreamHandler(sink)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    # Other libraries' chatter below WARNING is rarely useful.
    root.setLevel(max(numeric, logging.WARNING))
    logging.getLogger("aiohttp.access").disabled = True
