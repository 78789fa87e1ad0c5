"""Proposer progress as ``reasoning_content`` deltas, for chat UIs that show a model's thinking."""

from __future__ import annotations

from typing import Any

import aiohttp
import openai
import pytest
from support.requests import CHAT, body
from support.server import config, serving, stream
from support.sse import SSE

from moa_stream._exceptions import ConfigError
from moa_stream.config import loads_config


def deltas(sse: SSE, field: str) -> list[str]:
    return [
        c["choices"][0]["delta"][field]
        for c in sse.chunks
        if c.get("choices") and field in c["choices"][0]["delta"]
    ]


def first_index(sse: SSE, field: str) -> int:
    for i, c in enumerate(sse.chunks):
        if c.get("choices") and c["choices"][0]["delta"].get(field):
            return i
    raise AssertionError(f"no {field} delta")


async def test_reasoning_header_narrates_the_proposers_before_the_answer(
    session: aiohttp.ClientSession,
) -> None:
    async with serving() as srv:
        sse = await stream(session, srv.url, body(), headers={"X-MoA-Reasoning": "1"})
    assert sse.status == 200
    thinking = "".join(deltas(sse, "reasoning_content"))
    assert "a answered" in thinking and "b answered" in thinking
    assert "Layer 1 done (all): 2 of 2 answers go forward." in thinking
    assert "agg is writing the answer." in thinking
    # The role comes once, first; every reasoning delta comes before the first content token.
    assert sse.chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert sum("role" in c["choices"][0]["delta"] for c in sse.chunks if c.get("choices")) == 1
    assert first_index(sse, "reasoning_content") < first_index(sse, "content")
    last_thought = max(
        i
        for i, c in enumerate(sse.chunks)
        if c.get("choices") and "reasoning_content" in c["choices"][0]["delta"]
    )
    assert last_thought < first_index(sse, "content")
    assert sse.text, "the answer is still the content"
    assert not sse.comments, "no progress comments unless asked for"


async def test_progress_comments_are_the_same_with_reasoning_on(
    session: aiohttp.ClientSession,
) -> None:
    async with serving() as srv:
        plain = await stream(session, srv.url, body(moa_stream={"progress": True}))
        both = await stream(
            session, srv.url, body(moa_stream={"progress": True, "reasoning": True})
        )
    kinds = [p["type"] for p in plain.progress() if p["type"] != "proposer.tokens"]
    assert kinds == [p["type"] for p in both.progress() if p["type"] != "proposer.tokens"]
    assert deltas(both, "reasoning_content") and not deltas(plain, "reasoning_content")


async def test_reasoning_on_by_default_for_the_models_the_config_names(
    session: aiohttp.ClientSession,
) -> None:
    async with serving(config(reasoning_progress=("fast",))) as srv:
        fast = await stream(session, srv.url, body("fast"))
        single = await stream(session, srv.url, body("single"))
        client = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="unused")
        async with client:
            chunks = await client.chat.completions.create(
                model="fast", messages=[{"role": "user", "content": "hi"}], stream=True
            )
            thoughts, answer = [], []
            async for chunk in chunks:
                delta: Any = chunk.choices[0].delta if chunk.choices else None
                if delta is None:
                    continue
                if (delta.model_extra or {}).get("reasoning_content"):
                    thoughts.append(delta.model_extra["reasoning_content"])
                if delta.content:
                    answer.append(delta.content)
    assert deltas(fast, "reasoning_content")
    assert not deltas(single, "reasoning_content")
    assert thoughts and answer, "the SDK sees both, apart"


async def test_reasoning_flag_of_the_wrong_type_is_400(session: aiohttp.ClientSession) -> None:
    async with (
        serving() as srv,
        session.post(srv.url + CHAT, json=body(moa_stream={"reasoning": "yes"})) as resp,
    ):
        assert resp.status == 400
        assert (await resp.json())["error"]["param"] == "moa_stream.reasoning"


def test_config_names_only_known_models() -> None:
    text = """
[providers.sim]
kind = "sim"
[agents.a]
provider = "sim"
model = "m"
[moa.one]
preset = "single"
aggregator = "a"
[server]
reasoning_progress = ["two"]
"""
    with pytest.raises(ConfigError) as err:
        loads_config(text)
    assert err.value.path == "server.reasoning_progress"
    assert loads_config(text.replace('["two"]', '["*"]')).server.reasoning_progress == ("*",)


async def test_layer_done_counts_tokens_as_proposer_done_does(
    session: aiohttp.ClientSession,
) -> None:
    async with serving() as srv:
        sse = await stream(session, srv.url, body(moa_stream={"progress": True}))
    items = sse.progress()
    done = {p["agent"]: p["tokens"] for p in items if p["type"] == "proposer.done"}
    (layer,) = [p for p in items if p["type"] == "layer.done"]
    assert {r["agent"]: r["tokens"] for r in layer["references"]} == done
    (run,) = [p for p in items if p["type"] == "run.done"]
    (reported,) = run["report"]["layers"]
    assert {r["agent"]: r["tokens"] for r in reported["references"]} == done
