"""Context-window overflow in every form servers send it, over real sockets: a typed
ContextLengthError, never retried, that says how big the prompt was and what to change. Also
estimated usage when the server sends none, and the error for a closed provider."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web
from provhelpers import (
    HELLO,
    Seen,
    chunk,
    collect,
    error_response,
    provider_for,
    raw_server,
    request,
    serve_bytes,
    sse_response,
)

from moa_stream import (
    ContextLengthError,
    ProviderClosedError,
    ProviderError,
    RequestRejectedError,
    UpstreamError,
    UsageError,
)
from moa_stream.providers import estimate_prompt_tokens
from moa_stream.providers._chunks import context_length_error
from moa_stream.sim import SimModel, SimServer

LONG = "word " * 400  # 2,000 characters

OPENAI_400 = {
    "error": {
        "message": "This model's maximum context length is 8192 tokens. However, your messages "
        "resulted in 9013 tokens. Please reduce the length of the messages.",
        "type": "invalid_request_error",
        "param": "messages",
        "code": "context_length_exceeded",
    }
}
VLLM_400 = {
    "error": {
        "message": "'max_tokens' or 'max_completion_tokens' is too large: 8000. This model's "
        "maximum context length is 4096 tokens and your request has 2778 input tokens "
        "(8000 > 4096 - 2778). None",
        "type": "BadRequestError",
        "param": None,
        "code": 400,
    }
}
VLLM_FLAT_400 = {
    "object": "error",
    "message": "This model's maximum context length is 2048 tokens. However, you requested "
    "2100 tokens (2000 in the messages, 100 in the completion). Please reduce the length.",
    "type": "BadRequestError",
    "param": None,
    "code": 400,
}
LLAMA_SERVER_400 = {
    "error": {
        "code": 400,
        "message": "the request exceeds the available context size, try increasing it",
        "type": "exceed_context_size_error",
        "n_prompt_tokens": 1717,
        "n_ctx": 256,
    }
}
LLAMA_CPP_PYTHON_400 = {
    "error": {
        "message": "Requested tokens (1717) exceed context window of 256",
        "type": "invalid_request_error",
        "param": "messages",
        "code": "context_length_exceeded",
    }
}
ANTHROPIC_400 = {
    "type": "error",
    "error": {
        "type": "invalid_request_error",
        "message": "prompt is too long: 210000 tokens > 200000 maximum",
    },
}


@pytest.mark.parametrize(
    ("body", "prompt_tokens", "window"),
    [
        pytest.param(OPENAI_400, 9013, 8192, id="openai"),
        pytest.param(VLLM_400, 2778, 4096, id="vllm"),
        pytest.param(VLLM_FLAT_400, 2100, 2048, id="vllm-flat"),
        pytest.param(LLAMA_SERVER_400, 1717, 256, id="llama-server"),
        pytest.param(LLAMA_CPP_PYTHON_400, 1717, 256, id="llama-cpp-python"),
        pytest.param(ANTHROPIC_400, 210000, 200000, id="anthropic"),
    ],
)
async def test_http_400_overflow_is_typed_and_never_retried(
    body: dict[str, Any], prompt_tokens: int, window: int
) -> None:
    async def handler(request: web.Request, seen: Seen) -> web.StreamResponse:
        return error_response(400, body)

    async with raw_server(handler) as server, provider_for(server) as provider:
        with pytest.raises(ContextLengthError) as info:
            await collect(provider, request(LONG))
    assert len(server.seen) == 1
    exc = info.value
    assert isinstance(exc, RequestRejectedError)
    assert exc.status == 400
    assert exc.provider == "test"
    assert exc.prompt_tokens == prompt_tokens
    assert exc.context_window == window
    estimate = estimate_prompt_tokens(request(LONG).messages)
    assert exc.estimated_prompt_tokens == estimate
    assert f"about {estimate} tokens" in str(exc)
    assert "2,000 characters" in str(exc)
    assert "max_reference_chars" in str(exc)


async def test_empty_200_stream_is_an_overflow_not_a_truncation() -> None:
    """llama-cpp-python's streamed answer to a prompt over its context: 200, no body at all."""
    async with raw_server(serve_bytes(b"")) as server, provider_for(server) as provider:
        with pytest.raises(ContextLengthError) as info:
            await collect(provider, request(LONG))
    assert len(server.seen) == 1, "an overflow is never retried"
    assert info.value.status == 200
    assert "empty body" in str(info.value)
    assert "max_reference_chars" in str(info.value)


async def test_overflow_error_frame_inside_a_stream() -> None:
    frame = b'data: {"error": {"message": "maximum context length is 512 tokens"}}\n\n'
    body = chunk("", role="assistant") + frame
    async with raw_server(serve_bytes(body)) as server, provider_for(server) as provider:
        with pytest.raises(ContextLengthError) as info:
            await collect(provider)
    assert info.value.context_window == 512
    assert len(server.seen) == 1


async def test_other_400s_stay_plain_rejections() -> None:
    async def handler(request: web.Request, seen: Seen) -> web.StreamResponse:
        body = {"error": {"message": "Invalid 'messages': empty array.", "code": "empty_array"}}
        return error_response(400, body)

    async with raw_server(handler) as server, provider_for(server) as provider:
        with pytest.raises(RequestRejectedError) as info:
            await collect(provider)
    assert not isinstance(info.value, ContextLengthError)


async def test_a_200_with_a_role_chunk_only_is_still_a_truncation() -> None:
    """Only a body with no bytes at all reads as an overflow; anything else is retried."""

    async def handler(request: web.Request, seen: Seen) -> web.StreamResponse:
        if seen.index == 0:
            return await sse_response(request, chunk("", role="assistant"))
        return await sse_response(request, HELLO)

    async with raw_server(handler) as server, provider_for(server) as provider:
        assert await collect(provider) == "Hello world"
    assert len(server.seen) == 2


@pytest.mark.parametrize(
    ("message", "code", "error_type", "overflow"),
    [
        ("Rate limit reached", "rate_limit_exceeded", "requests", False),
        ("The model `x` does not exist", "model_not_found", None, False),
        ("anything", "context_length_exceeded", None, True),
        ("anything", None, "exceed_context_size_error", True),
        ("Input is longer than the context length", None, None, False),
        ("Context length exceeded for this request", None, None, True),
    ],
)
def test_context_length_error_recognises_only_overflows(
    message: str, code: str | None, error_type: str | None, overflow: bool
) -> None:
    assert (context_length_error(message, code, error_type) is not None) is overflow


# -- against the simulator -----------------------------------------------------------------------


@pytest.mark.parametrize("style", ["openai", "llama-server", "llama-cpp-python"])
async def test_simulated_servers_overflow_in_their_own_words(style: str) -> None:
    model = SimModel(name="tiny", context_window=64, overflow=style)  # type: ignore[arg-type]
    async with SimServer(models=[model], seed=0) as sim, provider_for(sim.base_url) as provider:
        assert await collect(provider, request("short", model="tiny"))
        with pytest.raises(ContextLengthError) as info:
            await collect(provider, request(LONG, model="tiny"))
        records = sim.records
    assert len(records) == 2, "the overflow was not retried"
    assert records[1].outcome == "fault:context_overflow"
    assert records[1].status == (200 if style == "llama-cpp-python" else 400)
    if style != "llama-cpp-python":
        assert info.value.context_window == 64
        assert info.value.prompt_tokens == records[1].prompt_tokens


async def test_forced_overflow_fault_and_a_server_without_usage() -> None:
    model = SimModel(name="lcp", overflow="llama-cpp-python", sends_usage=False, answer_tokens=5)
    async with SimServer(models=[model], seed=0) as sim, provider_for(sim.base_url) as provider:
        async with provider.stream(request("Say hi.", model="lcp")) as stream:
            deltas = [d async for d in stream]
        assert all(d.usage is None for d in deltas), "the server sent no usage"
        usage = stream.usage
        assert usage is not None and usage.estimated
        assert usage.completion_tokens == 5
        assert usage.prompt_tokens == estimate_prompt_tokens(request("Say hi.").messages)
        forced = request("Say hi.", model="lcp", extra={"sim": {"fault": "context_overflow"}})
        with pytest.raises(ContextLengthError):
            await collect(provider, forced)


def test_prompt_estimate_counts_messages_and_the_template() -> None:
    one = [{"role": "user", "content": "x" * 40}]
    with_system = [{"role": "system", "content": "Be brief."}, *one]
    # 10 tokens of text, 4 per message, 3 for the reply, and a default system message
    # (16 + 4) when the conversation has none.
    assert estimate_prompt_tokens(one) == 10 + 4 + 3 + 20  # type: ignore[arg-type]
    assert estimate_prompt_tokens(with_system) == 3 + 4 + 10 + 4 + 3  # type: ignore[arg-type]
    two_turns = [*one, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "?"}]
    assert estimate_prompt_tokens(two_turns) == estimate_prompt_tokens(one) + 4 + 1 + 4 + 1  # type: ignore[arg-type]


# -- a closed provider ---------------------------------------------------------------------------


async def test_a_closed_provider_is_a_usage_error_not_an_upstream_failure() -> None:
    async with raw_server(serve_bytes(HELLO)) as server:
        provider = provider_for(server)
        await provider.aclose()
        with pytest.raises(ProviderClosedError) as info:
            await collect(provider)
        await provider.prewarm()  # an optimisation: quietly does nothing
    assert isinstance(info.value, UsageError)
    assert isinstance(info.value, RuntimeError)
    assert not isinstance(info.value, ProviderError)
    assert not isinstance(info.value, UpstreamError)
    assert server.seen == []
