"""What an upstream's failures become: the :class:`~moa_stream.ProviderError` for an HTTP
status, a transport exception or an expired deadline.

Shared by the HTTP attempt (:mod:`moa_stream.providers._http`) and the providers without an HTTP
layer of their own (LiteLLM), so that a 429 or a first-token timeout reads the same whichever
provider met it. Pure: no I/O, nothing raised.
"""

from __future__ import annotations

from collections.abc import Mapping

import aiohttp
import orjson

from moa_stream._exceptions import (
    AuthenticationError,
    ConnectError,
    ConnectTimeout,
    FirstTokenTimeout,
    IdleTimeout,
    ModelNotFoundError,
    ProtocolError,
    ProviderError,
    RateLimitError,
    RequestRejectedError,
    ServerError,
    StreamInterruptedError,
    TotalTimeout,
)
from moa_stream._secrets import MAX_UPSTREAM_ID_CHARS
from moa_stream._wire import parse_retry_after
from moa_stream.providers._chunks import MAX_ERROR_CHARS, context_length_error, error_fields
from moa_stream.providers._policy import Timeouts

__all__ = [
    "connect_timeout",
    "first_token_timeout",
    "idle_timeout",
    "status_error",
    "status_error_class",
    "total_timeout",
    "transport_error",
]


def status_error_class(status: int) -> type[ProviderError]:
    """The error class of a non-2xx HTTP status."""
    if status in (401, 403):
        return AuthenticationError
    if status == 404:
        return ModelNotFoundError
    if status == 429:
        return RateLimitError
    if status == 408 or status >= 500:
        return ServerError
    if 400 <= status < 500:
        return RequestRejectedError
    return ProtocolError


def status_error(
    status: int, body: bytes, headers: Mapping[str, str], reason: str | None
) -> ProviderError:
    """The error for a non-2xx response with (a bounded part of) its body."""
    try:
        obj: object = orjson.loads(body)
    except orjson.JSONDecodeError:
        obj = None
    fields = error_fields(obj)
    if fields is None:
        fields = (body.decode("utf-8", "replace").strip()[:MAX_ERROR_CHARS], None, None)
    message, code, error_type = fields
    if not message:
        message = reason or "error"
    # The error's code and type are the upstream's words too: bounded like its id.
    code = code[:MAX_UPSTREAM_ID_CHARS] if code else code
    error_type = error_type[:MAX_UPSTREAM_ID_CHARS] if error_type else error_type
    cls = status_error_class(status)
    if cls is RequestRejectedError:
        overflow = context_length_error(f"HTTP {status}: {message}", code, error_type, obj)
        if overflow is not None:
            overflow.status = status
            return overflow
    retry_after = parse_retry_after(headers) if cls in (RateLimitError, ServerError) else None
    return cls(
        f"HTTP {status}: {message}",
        status=status,
        code=code,
        error_type=error_type,
        retry_after=retry_after,
    )


def transport_error(exc: BaseException, *, started: bool) -> ProviderError:
    """The error for aiohttp's or the OS's exception, before (``started=False``) or after the
    response headers arrived."""
    detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if isinstance(exc, aiohttp.ClientResponseError):
        return ProtocolError(f"invalid HTTP response: {detail}")
    if started or isinstance(exc, aiohttp.ClientPayloadError):
        return StreamInterruptedError(f"connection lost mid-stream: {detail}")
    return ConnectError(f"request failed before a response: {detail}")


def connect_timeout(timeouts: Timeouts) -> ConnectTimeout:
    return ConnectTimeout(
        f"no response headers within {timeouts.connect} s", timeout=timeouts.connect
    )


def first_token_timeout(timeouts: Timeouts) -> FirstTokenTimeout:
    return FirstTokenTimeout(
        f"no token within {timeouts.first_token} s of sending the request",
        timeout=timeouts.first_token,
    )


def idle_timeout(timeouts: Timeouts) -> IdleTimeout:
    return IdleTimeout(f"no data for {timeouts.idle} s", timeout=timeouts.idle)


def total_timeout(timeouts: Timeouts) -> TotalTimeout:
    return TotalTimeout(f"the stream took over {timeouts.total} s", timeout=timeouts.total)
