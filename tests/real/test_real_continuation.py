"""Continuing a trailing assistant message (assistant prefill) on llama-server.

The staircase continues an answer it already started by sending the text so far as a trailing
assistant message. llama-server continues that message instead of starting a new turn; streamed,
it repeats the prefilled text at the start of its first delta (and, not streamed, at the start
of the message), which a caller has to strip. These tests pin both facts through
:class:`~moa_stream.OpenAIProvider`.
"""

from __future__ import annotations

import pytest
from realhelpers import QUESTION, chat_request, collect, provider, raw_session, text_of

from moa_stream import ChatMessage
from moa_stream.testing.llamacpp import InferenceServer

pytestmark = [pytest.mark.real, pytest.mark.timeout(300)]

PREFILL = "The capital of France is"


def _prefilled(prefill: str) -> list[ChatMessage]:
    return [*QUESTION, {"role": "assistant", "content": prefill}]


async def test_streamed_continuation_echoes_the_prefill_first(llama: InferenceServer) -> None:
    async with provider(llama.base_url) as prov:
        deltas, stream = await collect(prov, chat_request(_prefilled(PREFILL), max_tokens=8))
    content = [d.content for d in deltas if d.content]
    # The whole prefill comes back first, in one delta, then the continuation token by token.
    assert content[0].startswith(PREFILL)
    continuation = text_of(deltas)[len(PREFILL) :]
    # It goes on from the prefill ("... is Paris."), instead of answering again from the start.
    assert continuation.lstrip().startswith("Paris")
    assert "capital" not in continuation
    # The echo is not generated: only the continuation's tokens are counted.
    usage = stream.usage
    assert usage is not None and not usage.estimated
    assert usage.completion_tokens <= len(content) + 1


async def test_continuation_is_the_same_text_streamed_or_not(llama: InferenceServer) -> None:
    """Not streamed, the message also starts with the prefill: both forms return the prefill
    followed by the same (greedy) continuation."""
    async with provider(llama.base_url) as prov:
        deltas, _ = await collect(prov, chat_request(_prefilled(PREFILL), max_tokens=8))
    async with (
        raw_session() as session,
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
    assert plain.startswith(PREFILL)
    assert text_of(deltas) == plain
