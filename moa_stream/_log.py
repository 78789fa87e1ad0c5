"""The library is silent until the application configures logging.

The library's modules log through ``structlog.get_logger("moa_stream....")``. Unconfigured,
structlog prints every line on stdout, so a program that only imports ``moa_stream`` would
find ``[warning ] provider.failed ...`` in the middle of its own output. A library must not
write on stdout, nor decide where its warnings go: the application does.

So, as long as the application has not configured structlog, the ``moa_stream.*`` loggers are
routed to the standard :mod:`logging` module under the same names, and the ``moa_stream``
logger gets a :class:`logging.NullHandler` (what httpx and most libraries do): nothing is
printed unless the application configures :mod:`logging` (``logging.basicConfig()`` shows
the warnings on stderr). Other structlog loggers of the application keep structlog's own
defaults, and once the application calls ``structlog.configure(...)`` its configuration
applies to the library's lines as well, as before. The ``moa-stream`` commands configure
logging themselves (:mod:`moa_stream.cli.logs`) and log to stderr.

This needs structlog's defaults replaced without marking structlog as configured (an
application may configure it only when :func:`structlog.is_configured` is false, or with
``structlog.configure_once``), which only its private ``_config`` module allows; if that ever
changes, the defaults are left alone.
"""

from __future__ import annotations

import logging
from typing import Any

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

__all__ = ["LIBRARY_LOGGER", "quiet_until_configured"]

#: The standard-library logger above every logger of the package.
LIBRARY_LOGGER = "moa_stream"


def _is_library(name: object) -> bool:
    return isinstance(name, str) and (
        name == LIBRARY_LOGGER or name.startswith(LIBRARY_LOGGER + ".")
    )


class _LibraryToStdlib:
    """A logger factory: the package's loggers are standard-library loggers while structlog is
    unconfigured; anything else gets what structlog's default factory makes."""

    def __init__(self, fallback: Any) -> None:
        self.fallback = fallback

    def __call__(self, *args: Any) -> WrappedLogger:
        if args and _is_library(args[0]) and not structlog.is_configured():
            return logging.getLogger(args[0])
        return self.fallback(*args)


class _PlainForStdlib:
    """The last processor: for a standard-library logger, a plain ``event key=value`` message
    (its handlers add the time and level, and colours belong to the application); for any
    other logger, structlog's default renderer."""

    def __init__(self, fallback: Processor) -> None:
        self.fallback = fallback

    def __call__(self, logger: WrappedLogger, method: str, event_dict: EventDict) -> Any:
        if not isinstance(logger, logging.Logger):
            return self.fallback(logger, method, event_dict)
        fields = dict(event_dict)
        event = fields.pop("event", "")
        exc_info = fields.pop("exc_info", None)
        for key in ("timestamp", "level", "logger"):
            fields.pop(key, None)
        message = " ".join([str(event), *(f"{k}={v!r}" for k, v in sorted(fields.items()))])
        if exc_info:
            return (message,), {"exc_info": exc_info}
        return message


def quiet_until_configured() -> None:
    """Route the package's structlog loggers to :mod:`logging` while structlog is
    unconfigured, and give the ``moa_stream`` logger a :class:`logging.NullHandler`.

    Idempotent; does nothing to a structlog configuration the application already made.
    """
    library = logging.getLogger(LIBRARY_LOGGER)
    if not any(isinstance(h, logging.NullHandler) for h in library.handlers):
        library.addHandler(logging.NullHandler())
    if structlog.is_configured():
        return
    try:
        from structlog import _config

        defaults = _config._CONFIG
        factory = defaults.logger_factory
        processors = list(defaults.default_processors)
    except (ImportError, AttributeError):  # pragma: no cover - a structlog without them
        return
    if isinstance(factory, _LibraryToStdlib):
        return
    if processors and not isinstance(processors[-1], _PlainForStdlib):
        processors[-1] = _PlainForStdlib(processors[-1])
    defaults.default_processors = processors
    defaults.logger_factory = _LibraryToStdlib(factory)
