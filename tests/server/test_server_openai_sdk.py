"""The official openai SDK talks to the server as to any OpenAI-compatible API."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import openai
import pytest
from support.server import MOA_IDS, Running, config, serving, stream

KEY = "sk-test-4f1c2b9e"


@pytest.fixture
async def client(srv: Running) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0) as c:
        yield c


async def test_models_list_every_moa_id(client: openai.AsyncOpenAI) -> None:
    page = await client.models.list()
    assert [m.id for m in page.data] == MOA_IDS
    assert all(m.object == "model" and m.owned_by == "moa-stream" for m in page.data)
    model = await client.models.retrieve("fast")
    assert model.id == "fast"


async def test_non_streaming_completion(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(
        model="fast", messages=[{"role": "user", "content": "Why is the sky blue?"}]
    )
    assert completion.object == "chat.completion"
    assert completion.model == "fast"
    (choice,) = completion.choices
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason == "stop"
    assert completion.usage is not None
    # Two proposers and the aggregator: far more than the answer alone.
    assert completion.usage.completion_tokens > 12
    assert completion.usage.total_tokens == (
        completion.usage.prompt_tokens + completion.usage.completion_tokens
    )


async def test_streaming_completion_is_canonical(client: openai.AsyncOpenAI) -> None:
    chunks = [
        chunk
        async for chunk in await client.chat.completions.create(
            model="fast",
            messages=[{"role": "user", "content": "Why is the sky blue?"}],
            stream=True,
        )
    ]
    assert len(chunks) >= 3
    assert {c.id for c in chunks} == {chunks[0].id}
    assert {c.created for c in chunks} == {chunks[0].created}
    assert all(c.object == "chat.completion.chunk" and c.model == "fast" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:])
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks)


async def test_stream_with_include_usage_ends_with_usage(client: openai.AsyncOpenAI) -> None:
    chunks = [
        chunk
        async for chunk in await client.chat.completions.create(
            model="fast",
            messages=[{"role": "user", "content": "Why is the sky blue?"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    ]
    *content, last = chunks
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert last.usage.completion_tokens > 12
    assert all(c.usage is None and c.choices for c in content)


async def test_progress_stream_parses_cleanly(client: openai.AsyncOpenAI, srv: Running) -> None:
    """Progress comments are invisible to the SDK: same chunk shapes as without progress."""
    chunks = [
        chunk
        async for chunk in await client.chat.completions.create(
            model="degraded",
            messages=[{"role": "user", "content": "Why is the sky blue?"}],
            stream=True,
            stream_options={"include_usage": True},
            extra_headers={"X-MoA-Progress": "1"},
            extra_body={"moa_stream": {"progress": True}},
        )
    ]
    *content, last = chunks
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert all(len(c.choices) == 1 for c in content)
    assert content[0].choices[0].delta.role == "assistant"
    assert content[-1].choices[0].finish_reason == "stop"
    assert last.choices == [] and last.usage is not None

    # ...while the same request read raw does carry the progress.
    async with aiohttp.ClientSession() as session:
        sse = await stream(
            session, srv.url, {**_body("degraded"), "moa_stream": {"progress": True}}
        )
    types = [p["type"] for p in sse.progress()]
    assert "proposer.failed" in types and "run.done" in types


def _body(model: str) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "Why is the sky blue?"}]}


async def test_sdk_errors(client: openai.AsyncOpenAI) -> None:
    messages: list[openai.types.chat.ChatCompletionMessageParam] = [
        {"role": "user", "content": "hi"}
    ]
    with pytest.raises(openai.NotFoundError) as not_found:
        await client.chat.completions.create(model="nope", messages=messages)
    assert not_found.value.code == "model_not_found"

    with pytest.raises(openai.BadRequestError) as bad:
        await client.chat.completions.create(model="fast", messages=messages, temperature=7)
    assert bad.value.param == "temperature"

    # Every aggregator failed before the first token: a real status, before any chunk.
    with pytest.raises(openai.InternalServerError) as upstream:
        await client.chat.completions.create(model="agg-broken", messages=messages, stream=True)
    assert upstream.value.status_code == 502

    # The aggregator failed after it started: the error frame makes the SDK raise mid-stream.
    received = []

    async def consume() -> None:
        async for chunk in await client.chat.completions.create(
            model="agg-midfail", messages=messages, stream=True
        ):
            received.append(chunk)

    with pytest.raises(openai.APIError, match="aggregator"):
        await consume()
    assert received, "the stream had started before the failure"


async def test_sdk_authentication() -> None:
    async with serving(config(api_keys=(KEY,))) as srv:
        async with openai.AsyncOpenAI(
            base_url=f"{srv.url}/v1", api_key="sk-wrong", max_retries=0
        ) as wrong:
            with pytest.raises(openai.AuthenticationError) as exc:
                await wrong.models.list()
            assert exc.value.code == "invalid_api_key"
        async with openai.AsyncOpenAI(base_url=f"{srv.url}/v1", api_key=KEY) as right:
            completion = await right.chat.completions.create(
                model="single", messages=[{"role": "user", "content": "hi"}]
            )
            assert completion.choices[0].message.content
