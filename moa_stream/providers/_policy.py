"""The limits and the retry settings every HTTP provider applies (``Retry-After`` parsing is
in :mod:`moa_stream._wire`).

Values only: what the limits and retries *are*. :mod:`moa_stream.providers._retry` applies them.
"""

from __future__ import annotations

from dataclasses import dataclass

from moa_stream._exceptions import ConfigError

__all__ = ["RetryPolicy", "RetrySettings", "Timeouts"]


def _check_limit(value: float | None, name: str) -> None:
    if value is not None and not value > 0:
        raise ConfigError(f"must be a positive number of seconds or None, got {value!r}", path=name)


@dataclass(frozen=True, slots=True)
class Timeouts:
    """The four limits of one streamed request, in seconds; ``None`` means no limit.

    ``connect``: from sending an attempt until the response headers arrive.
    ``first_token``: from the moment the request was written until the first delta passed to
    the caller (content, reasoning, or a finish); role-only chunks and keep-alive comments do
    not count. Each attempt gets its own. ``idle``: the longest gap between two network reads
    once the headers are in (keep-alives do count: the connection is alive). ``total``: the
    whole stream, retries and back-off included.
    """

    connect: float | None = 10.0
    first_token: float | None = 60.0
    idle: float | None = 60.0
    total: float | None = 600.0

    def __post_init__(self) -> None:
        _check_limit(self.connect, "timeouts.connect")
        _check_limit(self.first_token, "timeouts.first_token")
        _check_limit(self.idle, "timeouts.idle")
        _check_limit(self.total, "timeouts.total")


@dataclass(frozen=True, slots=True)
class RetrySettings:
    """When and how a stream retries before its first delta reached the caller.

    Retried: connection failures, 408, 429 and 5xx, timeouts other than ``total``, and streams
    that broke or ended before any delta. Never retried once a delta was delivered.

    ``max_attempts`` counts requests, the first included (1 disables retries). The delay
    before retry *n* is ``min(backoff_cap, backoff_base * 2**(n-1))``, shortened by up to
    ``jitter`` (a fraction) at random so that many clients don't retry in step. A server's
    ``Retry-After`` / ``retry-after-ms`` replaces that delay; one asking for more than
    ``max_retry_after`` seconds is not retried at all, so that the caller can fail over to
    another provider at once instead of waiting.
    """

    max_attempts: int = 3
    backoff_base: float = 0.2
    backoff_cap: float = 2.0
    jitter: float = 0.25
    max_retry_after: float = 10.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ConfigError("must be at least 1", path="retry.max_attempts")
        if self.backoff_base < 0 or self.backoff_cap < 0 or self.max_retry_after < 0:
            raise ConfigError("delays must not be negative", path="retry")
        if not 0 <= self.jitter <= 1:
            raise ConfigError("must be between 0 and 1", path="retry.jitter")

    def delay(self, retry: int, rand: float) -> float:
        """Back-off before retry number ``retry`` (1-based); ``rand`` is uniform in [0, 1)."""
        base = min(self.backoff_cap, self.backoff_base * 2.0 ** (retry - 1))
        return base * (1.0 - self.jitter * rand)


#: The former name of :class:`RetrySettings`, kept so that code written against it still works.
#: (A "policy" in the engine is a layer's rule for ending it; these are only numbers.)
RetryPolicy = RetrySettings
