"""Continuing a trailing assistant message (assistant prefill) on llama-server.

The staircase continues an answer it already started by sending the text so far as a trailing
assistant message. llama-server continues that message instead of starting a new turn; streamed,
it repeats the prefilled text at the start of its first delta, which a caller has to strip.
These tests pin both facts through :class:`~moa_stream.OpenAIProvider`.
"""

from __future__ import annotations

import pytest
from realhelpers import QUESTION, chat_request, collect, provider, text_of

from moa_stream import ChatMessage
from moa_stream.llamacpp import InferenceServer

pytestmark = [pytest.mark.real, pytest.mark.timeout(300)]

PREFILL = "The capital of France is"


def _prefilled(prefill: str) -> list[ChatMessage]:
    return [*QUESTION, {"role": "assistant", "content": prefill}]


async def test_streamed_continuation_echoes_the_prefill_first(llama: InferenceServer) -> None:
    async with provider(llama.base_url) as prov:
        deltas, _ = await collect(prov, chat_request(_prefilled(PREFILL), max_tokens=8))
        fresh, _ = await collect(prov, chat_request(max_tokens=8))
    content = [d.content for d in deltas if d.content]
    # The whole prefill comes back first, in one piece, then the continuation token by token.
    assert content[0].startswith(PREFILL)
    continuation = text_of(deltas)[len(PREFILL) :]
    assert continuation.strip()
    assert "Paris" in continuation
    # A continuation, not a new answer: without the prefill the answer starts differently.
    assert not text_of(fresh).startswith(PREFILL + continuation)


async def test_continuation_is_the_same_text_streamed_or_not(llama: InferenceServer) -> None:
    """Streamed minus the echoed prefill equals the non-streamed continuation (greedy)."""
    import aiohttp

    async with provider(llama.base_url) as prov:
        deltas, _ = await collect(prov, chat_request(_prefilled(PREFILL), max_tokens=8))
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{llama.base_url}/chat/completions",
            json={
                "model": "smollm2",
                "messages": _prefilled(PREFILL),
                "max_tokens": 8,
                "temperature": 0,
                "seed": 7,
            },
        ) as resp,
    ):
        body = await resp.json()
    plain = body["choices"][0]["message"]["content"]
    streamed = text_of(deltas)
    assert streamed.removeprefix(PREFILL) in (plain, plain.removeprefix(PREFILL))
