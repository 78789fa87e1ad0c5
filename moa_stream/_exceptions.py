"""One exception hierarchy for the whole library.

Grouped by what a caller does about the error::

    MoAStreamError
    ├── ConfigError                 fix the configuration (names the field and where it is)
    ├── ProviderError               one upstream request failed (provider, model, status, id)
    │   ├── TransientError          may succeed if retried or sent elsewhere: retry / fail over
    │   │   ├── ConnectError            could not connect (refused, DNS, TLS, reset before headers)
    │   │   ├── RateLimitError          429, carries ``retry_after``
    │   │   ├── ServerError             5xx and 408
    │   │   ├── StreamInterruptedError  connection lost mid-stream
    │   │   ├── TruncatedStreamError    clean EOF before a finish_reason
    │   │   └── ProviderTimeout         one of the four timeouts fired
    │   │       ├── ConnectTimeout
    │   │       ├── FirstTokenTimeout   no *content* token in time
    │   │       ├── IdleTimeout         gap between chunks too long
    │   │       └── TotalTimeout        whole request too long
    │   ├── RequestRejectedError    4xx other than 408/429: fix the request, don't retry
    │   │   ├── AuthenticationError     401 / 403
    │   │   ├── ModelNotFoundError      404
    │   │   └── ContextLengthError      the prompt does not fit the model's context window
    │   ├── UpstreamError           an error frame inside a 200 stream
    │   └── ProtocolError           malformed SSE, invalid JSON, wrong types
    ├── MoAError                    the orchestration itself could not go on
    │   ├── LayerFailedError        a layer's policy can no longer be met (and degrade is off)
    │   └── AggregatorError         every aggregator failed; ``partial_text`` keeps what arrived
    └── UsageError                  the calling code used an object wrongly (also a RuntimeError)
        └── ProviderClosedError     a stream was asked of a provider after ``aclose()``

A :class:`UsageError` is a bug in the calling program, not an upstream failure: it is never a
``ProviderError``, so nothing retries it, fails over on it or counts it against an upstream.

No aiohttp, asyncio or orjson exception escapes a provider: they are translated at one boundary
(``moa_stream.providers._http``, or the adapter module of a provider that has no HTTP layer of
its own) and chained with ``raise ... from exc``. Messages never contain
API keys: the providers mask the key in everything an upstream supplied (its error body, its
request id, its error code) and bound its length before an error leaves them.
"""

from __future__ import annotations

from typing import TypedDict, Unpack

__all__ = [
    "AggregatorError",
    "AuthenticationError",
    "ConfigError",
    "ConnectError",
    "ConnectTimeout",
    "ContextLengthError",
    "ErrorDetails",
    "FirstTokenTimeout",
    "IdleTimeout",
    "LayerFailedError",
    "MoAError",
    "MoAStreamError",
    "ModelNotFoundError",
    "ProtocolError",
    "ProviderClosedError",
    "ProviderError",
    "ProviderTimeout",
    "RateLimitError",
    "RequestRejectedError",
    "ServerError",
    "StreamInterruptedError",
    "TotalTimeout",
    "TransientError",
    "TruncatedStreamError",
    "UpstreamError",
    "UsageError",
]


#: The most of an upstream's request id that an error's text carries.
_MAX_ID_CHARS = 128


class ErrorDetails(TypedDict, total=False):
    """Keyword arguments every :class:`ProviderError` accepts."""

    provider: str | None
    model: str | None
    status: int | None
    request_id: str | None
    code: str | None
    error_type: str | None
    delivered: bool
    retry_after: float | None


class MoAStreamError(Exception):
    """Base class of every error raised by moa_stream."""


class ConfigError(MoAStreamError):
    """A configuration value is missing or invalid.

    ``path`` names the field (``"moa.default.policy.quorum"``), ``source`` the file it came from.
    """

    def __init__(self, message: str, *, path: str | None = None, source: str | None = None):
        self.path = path
        self.source = source
        where = ""
        if path:
            where = f"{path}: "
        if source:
            where = f"{source}: {where}"
        super().__init__(f"{where}{message}")


class ProviderError(MoAStreamError):
    """One upstream request failed.

    Attributes are filled when known: ``provider`` (its configured name), ``model``, HTTP
    ``status``, the upstream's ``request_id``, the OpenAI error ``code`` and ``type``, and
    ``delivered``: whether content had already been passed to the caller (no retry then), and
    ``retry_after``: the delay in seconds the server asked for (``Retry-After``), if any.
    """

    #: short machine-readable name used in metrics and logs
    kind: str = "provider_error"

    # The details (:class:`ErrorDetails`) at their values when not given.
    provider: str | None = None
    model: str | None = None
    status: int | None = None
    request_id: str | None = None
    code: str | None = None
    error_type: str | None = None
    delivered: bool = False
    retry_after: float | None = None

    def __init__(self, message: str, **details: Unpack[ErrorDetails]) -> None:
        unknown = details.keys() - ErrorDetails.__optional_keys__
        if unknown:
            raise TypeError(f"{type(self).__name__} got unknown details: {sorted(unknown)}")
        self.message = message
        for name, value in details.items():
            setattr(self, name, value)
        super().__init__(message)

    def __str__(self) -> str:
        parts = [self.message]
        details = []
        if self.provider:
            details.append(f"provider={self.provider}")
        if self.model:
            details.append(f"model={self.model}")
        if self.status is not None:
            details.append(f"status={self.status}")
        if self.request_id:
            # The upstream's header, as it sent it: bounded here whoever made the error (the
            # providers also mask the key in it before it gets here).
            details.append(f"request_id={self.request_id[:_MAX_ID_CHARS]}")
        if details:
            parts.append("(" + ", ".join(details) + ")")
        return " ".join(parts)


class TransientError(ProviderError):
    """May succeed if retried later or sent to another provider."""

    kind = "transient"


class ConnectError(TransientError):
    """The connection could not be established or was lost before the response headers."""

    kind = "connect"


class RateLimitError(TransientError):
    """HTTP 429. ``retry_after`` is the delay the server asked for, in seconds, if any."""

    kind = "rate_limit"


class ServerError(TransientError):
    """HTTP 5xx or 408. ``retry_after`` is set when the server sent one."""

    kind = "server"


class StreamInterruptedError(TransientError):
    """The connection broke after the response started."""

    kind = "interrupted"


class TruncatedStreamError(TransientError):
    """The body ended cleanly but before any finish_reason or ``[DONE]``."""

    kind = "truncated"


class ProviderTimeout(TransientError):
    """Base class of the four timeouts. ``timeout`` is the limit that was exceeded (seconds)."""

    kind = "timeout"

    def __init__(
        self, message: str, *, timeout: float | None = None, **details: Unpack[ErrorDetails]
    ) -> None:
        super().__init__(message, **details)
        self.timeout = timeout


class ConnectTimeout(ProviderTimeout):
    """No connection (and response headers) within ``connect`` seconds."""

    kind = "connect_timeout"


class FirstTokenTimeout(ProviderTimeout):
    """No content token within ``first_token`` seconds of sending the request."""

    kind = "first_token_timeout"


class IdleTimeout(ProviderTimeout):
    """No chunk for ``idle`` seconds after the stream started."""

    kind = "idle_timeout"


class TotalTimeout(ProviderTimeout):
    """The whole request took longer than ``total`` seconds."""

    kind = "total_timeout"


class RequestRejectedError(ProviderError):
    """The upstream refused the request itself (4xx other than 408/429). Don't retry."""

    kind = "rejected"


class AuthenticationError(RequestRejectedError):
    """HTTP 401 or 403."""

    kind = "auth"


class ModelNotFoundError(RequestRejectedError):
    """HTTP 404: unknown model or endpoint."""

    kind = "not_found"


class ContextLengthError(RequestRejectedError):
    """The prompt (plus the room asked for the answer) does not fit the model's context window.

    Never retried: the same prompt fails the same way. Raised for every form servers use:
    OpenAI's and vLLM's 400 (``context_length_exceeded``, "maximum context length"),
    llama.cpp's llama-server 400 ``exceed_context_size_error``, llama-cpp-python's 400 and the
    empty HTTP 200 body it streams instead, Anthropic's "prompt is too long".

    ``prompt_tokens`` and ``context_window`` are the server's figures when it sent them
    (llama-server's ``n_prompt_tokens`` and ``n_ctx``); ``estimated_prompt_tokens`` is this
    library's estimate of the prompt's size (see :func:`moa_stream.estimate_tokens`).
    """

    kind = "context_length"

    def __init__(
        self,
        message: str,
        *,
        prompt_tokens: int | None = None,
        context_window: int | None = None,
        estimated_prompt_tokens: int | None = None,
        **details: Unpack[ErrorDetails],
    ) -> None:
        super().__init__(message, **details)
        self.prompt_tokens = prompt_tokens
        self.context_window = context_window
        self.estimated_prompt_tokens = estimated_prompt_tokens


class UpstreamError(ProviderError):
    """The upstream sent an error frame inside a stream that had started with status 200."""

    kind = "upstream"


class ProtocolError(ProviderError):
    """The response broke the protocol: malformed SSE, invalid JSON, wrong types."""

    kind = "protocol"


class MoAError(MoAStreamError):
    """The orchestration could not go on."""


class LayerFailedError(MoAError):
    """A layer's policy can no longer be met and the layer is set to raise, not degrade.

    ``errors`` holds the proposers' errors, by agent name.
    """

    def __init__(
        self, message: str, *, layer: int, errors: dict[str, BaseException] | None = None
    ) -> None:
        super().__init__(message)
        self.layer = layer
        self.errors = dict(errors or {})


class AggregatorError(MoAError):
    """The final answer could not be produced.

    Raised when every aggregator failed before its first token, or when the aggregator failed
    after it had started streaming (no fallback then). ``partial_text`` keeps the content that
    reached the caller; ``errors`` holds each attempt's error by agent name.
    """

    def __init__(
        self,
        message: str,
        *,
        partial_text: str = "",
        errors: dict[str, BaseException] | None = None,
    ) -> None:
        super().__init__(message)
        self.partial_text = partial_text
        self.errors = dict(errors or {})


class UsageError(MoAStreamError, RuntimeError):
    """An object was used in a way its contract forbids: a bug in the calling code.

    Also a :class:`RuntimeError`, as asyncio and httpx report the same kind of mistake (using a
    closed client, a resource from another event loop).
    """


class ProviderClosedError(UsageError):
    """A stream was requested from a provider after its ``aclose()``."""
