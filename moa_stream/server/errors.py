"""OpenAI-style errors: one exception type the handlers raise, one body shape clients parse.

Every error the server sends, whatever its cause, has the body OpenAI's API uses::

    {"error": {"message": "...", "type": "invalid_request_error", "param": null, "code": "..."}}

so an OpenAI SDK raises its usual exception classes (``BadRequestError``, ``NotFoundError``,
``AuthenticationError``, ``RateLimitError``, ``InternalServerError`` ...) with the message.
After a stream has started the same object goes out as ``data: {"error": {...}}``.

Each :class:`APIError` also carries an ``outcome``: the low-cardinality name it is counted
under in ``/metrics`` and written as in the request log.

Every error response says whether retrying is worth it, in the ``x-should-retry`` header that
the official OpenAI SDKs obey before their own status rules: ``true`` for 429 and 503 (another
moment or another instance will do), ``false`` for everything else. Without it the SDKs retry
a 502 or 504 twice, and each retry re-runs the whole MoA (every proposer and the aggregator)
for a failure it would most likely meet again.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Unpack

from aiohttp import web

from moa_stream._exceptions import AggregatorError, LayerFailedError, MoAError
from moa_stream._wire import WireError, WireErrorFields, retry_after_headers

__all__ = [
    "MAX_ECHO_CHARS",
    "MAX_MESSAGE_CHARS",
    "SHOULD_RETRY_HEADER",
    "APIError",
    "clip",
    "from_http_exception",
    "from_moa_error",
    "timeout_error",
]


#: The header the OpenAI SDKs read to decide on a retry before looking at the status.
SHOULD_RETRY_HEADER = "x-should-retry"
_RETRYABLE_STATUSES = frozenset({429, 503})

#: The most of one client-supplied string (a model id, a path, an origin, a header) that an
#: error message quotes or a log line carries: enough to recognise it, never the 500 KB a
#: client can put in a ``model`` field.
MAX_ECHO_CHARS = 200
#: The most of any error message the server sends or logs. Messages quote client values (the
#: wire module's) and upstream errors; a bound here holds whatever a quote forgot.
MAX_MESSAGE_CHARS = 2000


def clip(value: str, limit: int = MAX_ECHO_CHARS) -> str:
    """``value`` cut to ``limit`` characters, saying how long it was when cut, so that a reader
    knows the quote is partial."""
    if len(value) <= limit:
        return value
    return f"{value[:limit]}... ({len(value)} characters)"


def quote(value: str) -> str:
    """A client-supplied string as an error message quotes it: bounded, then ``repr``-ed."""
    return repr(clip(value))


class APIError(WireError):
    """An error to send to the client: HTTP ``status`` plus the OpenAI error fields (the
    keywords of :class:`~moa_stream._wire.WireError`: ``error_type``, ``param``, ``code``).

    ``headers`` are added to the response (``Retry-After``, ``Allow``); ``outcome`` names the
    request's result in metrics and logs.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        outcome: str = "invalid_request",
        close_connection: bool = False,
        **fields: Unpack[WireErrorFields],
    ) -> None:
        super().__init__(status, clip(message, MAX_MESSAGE_CHARS), **fields)
        self.outcome = outcome
        self.close_connection = close_connection

    @classmethod
    def from_wire(cls, exc: WireError) -> APIError:
        """The server's error for a request the wire format refused (a 400)."""
        if isinstance(exc, APIError):
            return exc
        return cls(
            exc.status,
            exc.message,
            error_type=exc.error_type,
            param=exc.param,
            code=exc.code,
            headers=exc.headers,
        )

    @property
    def retryable(self) -> bool:
        """Whether a client should retry: only when the server is busy or going away."""
        return self.status in _RETRYABLE_STATUSES

    def response_headers(self) -> dict[str, str]:
        """The headers every response of this error carries, whatever writes it:
        ``x-should-retry`` and the error's own (``Retry-After``, ``Allow`` ...)."""
        return {SHOULD_RETRY_HEADER: "true" if self.retryable else "false", **self.headers}

    def response(self, headers: Mapping[str, str] | None = None) -> web.Response:
        """A JSON response with this error's status, body and headers."""
        response = web.Response(
            status=self.status,
            body=self.body(),
            content_type="application/json",
            headers={**self.response_headers(), **(headers or {})},
        )
        if self.close_connection:
            response.force_close()
        return response

    # -- the errors the server raises, in one place so that status, type and code agree -----

    @classmethod
    def bad_request(
        cls, message: str, param: str | None = None, code: str | None = None
    ) -> APIError:
        """400: the body is malformed or a field is missing or of the wrong type or value."""
        return cls(400, message, param=param, code=code)

    @classmethod
    def invalid_api_key(cls) -> APIError:
        """401: the bearer key is missing or not one of the configured keys."""
        return cls(
            401,
            "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>'.",
            code="invalid_api_key",
            outcome="unauthorized",
            headers={"WWW-Authenticate": "Bearer"},
        )

    @classmethod
    def model_not_found(cls, model: str, known: list[str]) -> APIError:
        """404: the model id names no ``[moa.<id>]`` of the config."""
        return cls(
            404,
            f"The model {quote(model)} does not exist. Available models: {', '.join(known)}.",
            param="model",
            code="model_not_found",
        )

    @classmethod
    def too_many_streams(cls, limit: int, retry_after: int = 1) -> APIError:
        """429: ``max_concurrent_streams`` requests are already running."""
        return cls(
            429,
            f"The server is at its limit of {limit} concurrent requests. Retry shortly.",
            error_type="rate_limit_error",
            code="too_many_concurrent_requests",
            outcome="rate_limited",
            headers=retry_after_headers(retry_after),
        )

    @classmethod
    def body_too_large(cls, limit: int) -> APIError:
        """413: the request body is over ``max_body_bytes``."""
        return cls(
            413,
            f"The request body is larger than the limit of {limit} bytes.",
            code="request_too_large",
        )

    @classmethod
    def body_timeout(cls, limit: float) -> APIError:
        """408: the request body did not arrive within ``body_timeout``."""
        return cls(
            408,
            f"The request body did not arrive within {limit:g} s.",
            code="request_body_timeout",
            close_connection=True,
        )

    @classmethod
    def expectation_failed(cls, expect: str) -> APIError:
        """417: an ``Expect`` header other than ``100-continue``, the one expectation HTTP/1.1
        defines (and the only one this server can meet)."""
        return cls(
            417,
            f"Unsupported Expect header {quote(expect)}: only '100-continue' is supported.",
            param="Expect",
            code="expectation_failed",
        )

    @classmethod
    def unknown_path(cls, path: str) -> APIError:
        """404: no route at ``path``."""
        return cls(404, f"Unknown path {quote(path)}.", code="not_found", outcome="not_found")

    @classmethod
    def method_not_allowed(cls, allow: str | None = None) -> APIError:
        """405: the path has routes, none for this method (``allow`` lists theirs)."""
        return cls(
            405,
            "Method not allowed on this path.",
            code="method_not_allowed",
            headers={"Allow": allow} if allow else None,
        )

    @classmethod
    def internal(cls) -> APIError:
        """500: a bug. The message says nothing about it; the log has the traceback."""
        return cls(
            500,
            "The server had an error while processing your request.",
            error_type="server_error",
            code="internal_error",
            outcome="internal_error",
        )

    @classmethod
    def shutting_down(cls) -> APIError:
        """503: the server is draining before it exits."""
        return cls(
            503,
            "The server is shutting down. Retry on another instance.",
            error_type="server_error",
            code="shutting_down",
            outcome="shutting_down",
            headers=retry_after_headers(1),
        )


def from_moa_error(exc: MoAError) -> APIError:
    """The client-facing error for a run that could not produce its answer.

    502 (bad gateway): the fault is upstream of this server, and the OpenAI SDK retries 5xx.
    """
    if isinstance(exc, LayerFailedError):
        code = "layer_failed"
    elif isinstance(exc, AggregatorError):
        code = "aggregator_failed"
    else:
        code = "moa_failed"
    return APIError(502, str(exc), error_type="upstream_error", code=code, outcome="upstream_error")


def timeout_error(limit: float) -> APIError:
    """504: the request ran past the server's ``request_timeout``."""
    return APIError(
        504,
        f"The request did not complete within the server's limit of {limit:g} s.",
        error_type="timeout_error",
        code="request_timeout",
        outcome="timeout",
    )


def from_http_exception(exc: web.HTTPException, path: str) -> APIError:
    """aiohttp's routing and body-size exceptions as OpenAI-style errors (same status)."""
    status = exc.status
    if status == 404:
        return APIError.unknown_path(path)
    if status == 405:
        return APIError.method_not_allowed(exc.headers.get("Allow"))
    if status == 417:
        return APIError.expectation_failed((exc.text or "").removeprefix("Unknown Expect: "))
    error_type = "server_error" if status >= 500 else "invalid_request_error"
    outcome = "internal_error" if status >= 500 else "invalid_request"
    return APIError(status, exc.reason, error_type=error_type, outcome=outcome)


def as_json_error(response: web.Response) -> None:
    """Rewrite an error response aiohttp wrote itself (plain text, outside the middleware: an
    unmet ``Expect`` on a path without a route of ours) into the OpenAI error body, so that
    every error a client gets from this server parses the same way.

    Called from ``on_response_prepare``, the one hook such a response passes through: its
    headers are computed but not written yet, so ``Content-Length`` is set again for the new
    body. Responses that are already JSON, and successes, are left as they are.
    """
    if response.status < 400 or response.content_type == "application/json":
        return
    if response.body is not None and not isinstance(response.body, bytes | bytearray):
        return  # a streamed payload: not one of aiohttp's short error texts
    text = response.text or ""
    if response.status == 417:
        error = APIError.expectation_failed(text.removeprefix("Unknown Expect: "))
    else:
        error_type = "server_error" if response.status >= 500 else "invalid_request_error"
        error = APIError(response.status, response.reason, error_type=error_type)
    body = error.body()
    response.body = body
    response.content_type = "application/json"
    if "Content-Length" in response.headers:
        response.headers["Content-Length"] = str(len(body))
    response.headers[SHOULD_RETRY_HEADER] = "true" if error.retryable else "false"
