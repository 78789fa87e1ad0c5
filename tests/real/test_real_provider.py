"""OpenAIProvider against real llama.cpp servers: streaming, usage, continuation."""

from __future__ import annotations

import orjson
import pytest
from realhelpers import QUESTION, chat_request, collect, provider, raw_session, text_of

from moa_stream import ChatMessage
from moa_stream._types import estimate_tokens
from moa_stream.testing.llamacpp import InferenceServer

pytestmark = [pytest.mark.real, pytest.mark.timeout(300)]


@pytest.mark.parametrize("server_fixture", ["llama", "lcpp_small"])
async def test_streams_tokens_through_openai_provider(
    server_fixture: str, request: pytest.FixtureRequest
) -> None:
    """Each server streams the answer token by token, ending with a finish reason."""
    server: InferenceServer = request.getfixturevalue(server_fixture)
    async with provider(server.base_url) as prov:
        deltas, stream = await collect(prov, chat_request(max_tokens=16))
    content = [d for d in deltas if d.content]
    assert len(content) >= 3, deltas  # token by token, not one block
    assert "Paris" in text_of(deltas)
    assert stream.finish_reason in ("stop", "length")
    timings = stream.timings
    assert timings.attempts == 1
    assert timings.first_token is not None and timings.end is not None
    assert timings.first_token < timings.end
    # One arrival time per delta handed out: the tokens really came one at a time.
    assert len(timings.chunk_times) == len(deltas)
    assert timings.chunk_times == sorted(timings.chunk_times)


async def test_llama_server_usage_is_reported_not_estimated(llama: InferenceServer) -> None:
    """llama-server sends usage at the end of a stream that asked for it; the provider passes
    the server's figures on, matching a non-streamed request for the same prompt."""
    async with provider(llama.base_url) as prov:
        deltas, stream = await collect(prov, chat_request(max_tokens=12))
    usage = stream.usage
    assert usage is not None and not usage.estimated
    async with (
        raw_session() as session,
        session.post(
            f"{llama.base_url}/chat/completions",
            json={"model": "smollm2", "messages": QUESTION, "max_tokens": 12, "temperature": 0},
        ) as resp,
    ):
        plain = await resp.json()
    # The chat template and the system prompt count: far more than the characters / 4.
    assert usage.prompt_tokens == plain["usage"]["prompt_tokens"]
    assert usage.prompt_tokens > len(QUESTION[0]["content"]) // 4
    assert usage.completion_tokens == plain["usage"]["completion_tokens"]
    # Every token it sent, plus the end-of-turn token it counts but does not send.
    assert usage.completion_tokens - len([d for d in deltas if d.content]) in (0, 1)


async def test_llama_cpp_python_sends_no_usage_so_it_is_estimated(
    lcpp_small: InferenceServer,
) -> None:
    async with provider(lcpp_small.base_url) as prov:
        deltas, stream = await collect(prov, chat_request(max_tokens=12))
    usage = stream.usage
    assert usage is not None and usage.estimated
    # The estimate is the package's one rule, from the characters that arrived.
    chars = sum(len(d.content) + len(d.reasoning) for d in deltas)
    assert usage.completion_tokens == estimate_tokens(chars) > 0


async def test_llama_server_reports_cached_prompt_tokens(llama: InferenceServer) -> None:
    """The same prompt twice: the second request reuses the first one's KV cache and says so in
    ``usage.prompt_tokens_details.cached_tokens``."""
    messages: list[ChatMessage] = [
        {"role": "user", "content": "Name three colours of the rainbow."}
    ]
    body = {
        "model": "smollm2",
        "messages": messages,
        "max_tokens": 4,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    usages = []
    async with raw_session() as session:
        for _ in range(2):
            async with session.post(f"{llama.base_url}/chat/completions", json=body) as resp:
                assert resp.status == 200
                raw = await resp.read()
            frames = [
                line[len(b"data: ") :]
                for line in raw.split(b"\n")
                if line.startswith(b"data: ") and line != b"data: [DONE]"
            ]
            usage = [orjson.loads(f).get("usage") for f in frames]
            usages.append(next(u for u in usage if u))
    first, second = usages
    assert first["prompt_tokens"] == second["prompt_tokens"]
    assert second["prompt_tokens_details"]["cached_tokens"] > 0
    assert second["prompt_tokens_details"]["cached_tokens"] < second["prompt_tokens"]
    # The provider passes the cached count on, as the server reported it.
    async with provider(llama.base_url) as prov:
        _, stream = await collect(prov, chat_request(messages, max_tokens=4))
    usage = stream.usage
    assert usage is not None and not usage.estimated
    assert usage.prompt_tokens == second["prompt_tokens"]
    assert 0 < usage.cached_prompt_tokens < usage.prompt_tokens
