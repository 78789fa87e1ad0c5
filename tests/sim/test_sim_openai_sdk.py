"""The official openai SDK talks to the simulator without complaint."""

from __future__ import annotations

import openai
import pytest
from support.sim import SIM_MODELS

from moa_stream.sim import SimServer

# The simulator fixture: two fast models, "m" and "other".
pytestmark = pytest.mark.moa_sim(*SIM_MODELS, seed=0)

MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [
    {"role": "user", "content": "Tell me something."}
]


async def test_sdk_streams_with_usage(sim: SimServer) -> None:
    async with openai.AsyncOpenAI(base_url=sim.base_url, api_key="x") as client:
        stream = await client.chat.completions.create(
            model="m", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
        )
        parts: list[str] = []
        finish = None
        usage = None
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                parts.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
        completion = await client.chat.completions.create(model="m", messages=MESSAGES)
    assert finish == "stop"
    assert usage is not None
    assert usage.completion_tokens == 20
    assert "".join(parts) == completion.choices[0].message.content
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 20


async def test_sdk_lists_models(sim: SimServer) -> None:
    async with openai.AsyncOpenAI(base_url=sim.base_url, api_key="x") as client:
        models = [m.id async for m in client.models.list()]
    assert models == ["m", "other"]


async def test_sdk_retries_a_forced_rate_limit_then_succeeds(sim: SimServer) -> None:
    async with openai.AsyncOpenAI(base_url=sim.base_url, api_key="x", max_retries=2) as client:
        completion = await client.chat.completions.create(
            model="m",
            messages=MESSAGES,
            extra_body={"sim": {"fault": "rate_limit", "times": 1, "retry_after": 0.01}},
        )
    assert completion.choices[0].message.content
    assert [r.outcome for r in sim.records] == ["fault:rate_limit", "complete"]


async def test_sdk_maps_errors(sim: SimServer) -> None:
    async with openai.AsyncOpenAI(base_url=sim.base_url, api_key="x", max_retries=0) as client:
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="missing", messages=MESSAGES)
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(
                model="m", messages=MESSAGES, extra_body={"sim": {"fault": "rate_limit"}}
            )
