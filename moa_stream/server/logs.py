"""Logging set-up for the server process: one JSON object per line, on stderr.

The library only ever calls ``structlog.get_logger()``; this module is the one place that
configures structlog, and only ``moa-stream serve`` calls it. Records of the standard
``logging`` module (aiohttp's, asyncio's) go through the same renderer, so every line the
process writes is JSON.

Secrets: request headers are never logged, and :func:`configure_logging` also installs a
processor that replaces any configured API key found in a log line's values with
``[redacted]`` before the line is rendered, as a second line of defence.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import Any, TextIO

import orjson
import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from moa_stream._secrets import mask_secrets

__all__ = ["Redactor", "configure_logging"]

LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


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


def _orjson_str(obj: Any, **_: Any) -> str:
    return orjson.dumps(obj, default=str).decode()


def configure_logging(
    *,
    level: str = "info",
    stream: TextIO | None = None,
    secrets: Iterable[str] = (),
) -> None:
    """Send structlog and standard-library logging to ``stream`` (stderr) as JSON lines.

    ``level`` is ``debug``, ``info``, ``warning`` or ``error``; ``secrets`` are masked wherever
    they appear in a line.
    """
    out = stream if stream is not None else sys.stderr
    numeric = LEVELS[level]
    redact = Redactor(secrets)
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        redact,
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.JSONRenderer(serializer=_orjson_str)],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.WriteLoggerFactory(out),
        # Not cached: tests and a second configure() call must see the new set-up.
        cache_logger_on_first_use=False,
    )

    def add_logger_name(logger: WrappedLogger, method: str, event_dict: EventDict) -> EventDict:
        record = event_dict.get("_record")
        if isinstance(record, logging.LogRecord):
            event_dict["logger"] = record.name
        return event_dict

    formatter = structlog.stdlib.ProcessorFormatter(
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.JSONRenderer(serializer=_orjson_str),
        ],
        foreign_pre_chain=[add_logger_name, *shared],
    )
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    # Libraries' chatter below WARNING is rarely useful in a server's log.
    root.setLevel(max(numeric, logging.WARNING))
    logging.getLogger("aiohttp.access").disabled = True
