"""``moa-stream serve`` in front of real llama.cpp servers, used through the openai SDK.

The proposers and the aggregator are SmolLM2-135M-Instruct on llama-server; a test that kills an
upstream starts that upstream for itself.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import openai
import pytest
from realhelpers import QUESTION, Serve, moa_config, moa_serve, progress_stream, wait_for_log

from moa_stream.testing.llamacpp import InferenceServer, llama_server

pytestmark = [pytest.mark.real, pytest.mark.timeout(300)]

#: What llama-server logs when a client closes a request it is still generating for.
CANCEL_LOGGED = "cancel task"

MOAS = """
[moa.wait-all]
proposers = ["p1", "p2", "p3"]
aggregator = "agg"
policy = "wait_all"

[moa.quorum]
proposers = ["p1", "p2", "p3"]
aggregator = "agg"
policy = "quorum(2)"

[moa.partial]
proposers = ["p1", "p2", "p3"]
aggregator = "agg"
policy = "partial(3, min_tokens=8)"

[moa.long-answer]
proposers = ["p1"]
aggregator = "agg-long"
policy = "wait_all"
"""


@pytest.fixture(scope="module")
def serve(llama: InferenceServer) -> Iterator[Serve]:
    """A MoA server whose agents all run on the shared llama-server (four slots)."""
    config = moa_config(
        {"llama": llama.base_url},
        {
            "p1": ("llama", 24),
            "p2": ("llama", 24),
            "p3": ("llama", 24),
            "agg": ("llama", 32),
            "agg-long": ("llama", 400),
        },
        MOAS,
    )
    with moa_serve(config) as running:
        yield running


@pytest.fixture
async def client(serve: Serve) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=f"{serve.url}/v1", api_key="unused", max_retries=0, timeout=240
    ) as c:
        yield c


@pytest.mark.parametrize("moa_id", ["wait-all", "quorum", "partial"])
async def test_moa_streams_an_answer_through_the_sdk(
    client: openai.AsyncOpenAI, moa_id: str
) -> None:
    """A real MoA answers through the official SDK as any model would: one role chunk, content,
    a finish reason, and usage adding up every request of the run (the server's own counts)."""
    started = time.monotonic()
    first_token = None
    chunks = []
    async for chunk in await client.chat.completions.create(
        model=moa_id,
        messages=QUESTION,
        stream=True,
        stream_options={"include_usage": True},
        temperature=0,
    ):
        chunks.append(chunk)
        if first_token is None and chunk.choices and chunk.choices[0].delta.content:
            first_token = time.monotonic() - started
    assert first_token is not None
    *answer, usage_chunk = chunks
    text = "".join(c.choices[0].delta.content or "" for c in answer)
    assert text.strip()
    assert answer[-1].choices[0].finish_reason in ("stop", "length")
    assert usage_chunk.usage is not None
    # Three proposers and the aggregator, each with a chat-templated prompt of dozens of tokens.
    assert usage_chunk.usage.prompt_tokens > 4 * 20
    assert usage_chunk.usage.completion_tokens > len([c for c in answer if c.choices])


async def test_client_disconnect_cancels_the_upstream_generation(
    client: openai.AsyncOpenAI, serve: Serve, llama: InferenceServer
) -> None:
    """The client leaves after the first answer token; the aggregator's request to llama-server
    is closed at once and llama-server stops generating (its log says the task was cancelled)
    long before its 400 tokens."""
    log_before = len(llama.log_text())
    stream = await client.chat.completions.create(
        model="long-answer",
        messages=[{"role": "user", "content": "Write a long story about a lighthouse keeper."}],
        stream=True,
        temperature=0,
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    await stream.close()
    cancelled_after = await wait_for_log(llama, CANCEL_LOGGED, after=log_before, within=20)
    assert cancelled_after < 5
    # The server logs the request when it has ended: as a client disconnect.
    for _ in range(100):
        outcomes = [e.get("outcome") for e in serve.log_lines() if e.get("event") == "request"]
        if outcomes and outcomes[-1] == "client_disconnected":
            break
        await asyncio.sleep(0.1)
    assert outcomes[-1] == "client_disconnected"


async def test_a_proposer_killed_mid_answer_leaves_the_others_to_answer(
    llama: InferenceServer,
) -> None:
    """One proposer's server is killed (SIGKILL) while it is writing its answer: the layer goes
    on with the two others and the client gets a whole answer; the progress names the failure."""
    async with llama_server(ctx_size=512, slots=1, threads=1) as doomed:
        config = moa_config(
            {"llama": llama.base_url, "doomed": doomed.base_url},
            {
                "p1": ("llama", 24),
                "p2": ("llama", 24),
                "victim": ("doomed", 200),
                "agg": ("llama", 32),
            },
            '[moa.m]\nproposers = ["p1", "p2", "victim"]\naggregator = "agg"\n',
        )

        def kill_once_it_streams(item: dict[str, Any]) -> None:
            if item["type"] == "proposer.tokens" and item["tokens"].get("victim", 0) > 0:
                doomed.kill()

        with moa_serve(config) as serve:
            status, text, items, errors = await progress_stream(
                serve.url, "m", kill_once_it_streams
            )
        assert not doomed.running
    assert status == 200 and not errors
    assert text.strip()
    failed = [i for i in items if i["type"] == "proposer.failed"]
    assert [f["agent"] for f in failed] == ["victim"]
    (layer,) = [i for i in items if i["type"] == "layer.done"]
    statuses = {r["agent"]: r["status"] for r in layer["references"]}
    assert statuses["p1"] == statuses["p2"] == "complete"
    assert statuses["victim"] != "complete"


def _doomed_aggregator_config(
    llama: InferenceServer, doomed: InferenceServer, fallback: bool
) -> str:
    fallbacks = 'fallbacks = ["backup"]\n' if fallback else ""
    return moa_config(
        {"llama": llama.base_url, "doomed": doomed.base_url},
        {"p1": ("llama", 16), "p2": ("llama", 16), "agg": ("doomed", 48), "backup": ("llama", 32)},
        f'[moa.m]\nproposers = ["p1", "p2"]\naggregator = "agg"\n{fallbacks}policy = "wait_all"\n',
    )


async def test_an_aggregator_killed_before_its_turn_falls_back(llama: InferenceServer) -> None:
    """The aggregator's server is killed the moment the proposers are done: the run answers
    through the fallback agent, and the progress shows the failure and the fallback."""
    async with llama_server(ctx_size=512, slots=1, threads=1) as doomed:

        def kill_at_layer_done(item: dict[str, Any]) -> None:
            if item["type"] == "layer.done":
                doomed.kill()

        with moa_serve(_doomed_aggregator_config(llama, doomed, fallback=True)) as serve:
            status, text, items, errors = await progress_stream(serve.url, "m", kill_at_layer_done)
    assert status == 200 and not errors
    assert text.strip()
    kinds = [(i["type"], i.get("agent")) for i in items if i["type"].startswith("aggregator.")]
    assert kinds == [
        ("aggregator.started", "agg"),
        ("aggregator.failed", "agg"),
        ("aggregator.started", "backup"),
        ("aggregator.done", "backup"),
    ]


async def test_an_aggregator_killed_mid_answer_ends_the_stream_with_an_error(
    llama: InferenceServer,
) -> None:
    """Killed after its first token (a fallback can't take over a started answer): the stream
    ends with an ``aggregator_failed`` error frame and no finish chunk."""
    async with llama_server(ctx_size=512, slots=1, threads=1) as doomed:

        def kill_at_first_token(item: dict[str, Any]) -> None:
            if item["type"] == "content":
                doomed.kill()

        with moa_serve(_doomed_aggregator_config(llama, doomed, fallback=True)) as serve:
            status, text, _, errors = await progress_stream(serve.url, "m", kill_at_first_token)
    assert status == 200
    assert text  # what arrived before the kill
    assert [e["code"] for e in errors] == ["aggregator_failed"]


async def test_a_dead_aggregator_without_fallback_is_a_502_for_the_sdk(
    llama: InferenceServer,
) -> None:
    """No fallback and the aggregator's server is gone: the SDK gets a 502
    ``aggregator_failed`` (the proposers still ran), not a hang or an empty answer."""
    async with llama_server(ctx_size=512, slots=1, threads=1) as doomed:
        config = _doomed_aggregator_config(llama, doomed, fallback=False)
        with moa_serve(config) as serve:
            doomed.kill()
            async with openai.AsyncOpenAI(
                base_url=f"{serve.url}/v1", api_key="unused", max_retries=0, timeout=240
            ) as client:
                with pytest.raises(openai.APIStatusError) as info:
                    await client.chat.completions.create(
                        model="m", messages=QUESTION, temperature=0, stream=True
                    )
    assert info.value.status_code == 502
    assert info.value.code == "aggregator_failed"
