"""What a hostile upstream supplies (headers, error bodies, ids) leaves a provider masked
and bounded, because every bit of it reaches clients and logs through the error's text."""

from __future__ import annotations

import pytest
from aiohttp import web
from support.providers import (
    Handler,
    Seen,
    collect,
    error_response,
    provider_for,
    raw_server,
)

from moa_stream import ProviderError, ServerError
from moa_stream._secrets import MAX_UPSTREAM_ID_CHARS

KEY = "sk-hostile-0123456789abcdef"


async def _error_from(handler: Handler, expected: type[ProviderError]) -> ProviderError:
    """The ``expected`` error a provider holding ``KEY`` raises when ``handler`` answers it."""
    async with (
        raw_server(handler) as server,
        provider_for(server, api_key=KEY) as provider,
    ):
        with pytest.raises(expected) as info:
            await collect(provider)
    return info.value


async def test_a_key_in_the_request_id_header_is_masked() -> None:
    async def handler(request: web.Request, seen: Seen) -> web.StreamResponse:
        return error_response(500, {"error": {"message": "boom"}}, headers={"x-request-id": KEY})

    exc = await _error_from(handler, ServerError)
    assert KEY not in str(exc)
    assert KEY[:8] not in str(exc), "not even the key's start"
    assert exc.request_id is not None and KEY not in exc.request_id
    assert "request_id=***" in str(exc)


async def test_upstream_ids_and_codes_are_bounded_and_masked() -> None:
    long_id = "r" * 5000
    body = {"error": {"message": "nope", "code": KEY + "c" * 5000, "type": "t" * 5000}}

    async def handler(request: web.Request, seen: Seen) -> web.StreamResponse:
        return error_response(500, body, headers={"x-request-id": long_id})

    exc = await _error_from(handler, ProviderError)
    assert exc.request_id is not None and len(exc.request_id) <= MAX_UPSTREAM_ID_CHARS
    assert exc.code is not None and len(exc.code) <= MAX_UPSTREAM_ID_CHARS
    assert KEY not in exc.code and KEY[:8] not in exc.code
    assert exc.error_type is not None and len(exc.error_type) <= MAX_UPSTREAM_ID_CHARS
    assert len(str(exc)) < 1000


def test_error_text_bounds_an_id_whoever_made_the_error() -> None:
    exc = ProviderError("failed", request_id="x" * 10_000)
    assert len(str(exc)) < 300
