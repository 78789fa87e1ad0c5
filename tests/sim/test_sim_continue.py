"""The simulator continues answers (assistant prefill, appended turns) and keeps a per-model
prefix cache whose hits cost no prefill time."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from support.sim import CHAT
from support.sse import chunks, content, read_events

from moa_stream.sim import LatencyProfile, SimModel, SimServer
from moa_stream.sim._continue import PrefixCache, render_prompt
from moa_stream.sim.quiz import QUESTIONS, extract_answer

FAST = LatencyProfile.fixed(ttft=0.01, tokens_per_s=2000)
# Prefill slow enough that the cache decides the TTFT: 1,000 prompt tokens cost a second.
SLOW_PREFILL = LatencyProfile.fixed(ttft=0.0, tokens_per_s=2000, prefill_tokens_per_s=1000)
CONTINUE = "Continue your answer from exactly where it stopped, taking this into account."
QUESTION = "Why is the sea salty? Answer at length."


@pytest.fixture
async def sim() -> AsyncIterator[SimServer]:
    models = [
        SimModel(name="m", latency=FAST, answer_tokens=40),
        SimModel(
            name="llama",
            latency=FAST,
            answer_tokens=40,
            continue_trailing_assistant=True,
            echo_prefill=True,
        ),
        SimModel(name="slow-prefill", latency=SLOW_PREFILL, answer_tokens=5),
        SimModel(name="agg", latency=FAST, answer_tokens=40, accuracy=0.0),
    ]
    async with SimServer(models=models, seed=3) as server:
        yield server


async def ask(
    session: aiohttp.ClientSession, sim: SimServer, messages: list[dict[str, Any]], **extra: Any
) -> tuple[str, list[str], dict[str, Any]]:
    """Stream a request: the text, its content deltas, the usage object."""
    payload = {
        "model": "m",
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
        **extra,
    }
    async with session.post(sim.base_url + CHAT, json=payload) as resp:
        assert resp.status == 200, await resp.text()
        cs = chunks(await read_events(resp))
    deltas = [c["choices"][0]["delta"].get("content") or "" for c in cs if c.get("choices")]
    usage = next(c["usage"] for c in cs if c.get("usage"))
    return content(cs), [d for d in deltas if d], usage


USER = [{"role": "user", "content": QUESTION}]


async def test_a_vllm_style_prefill_continues_the_planned_text(
    sim: SimServer, session: aiohttp.ClientSession
) -> None:
    whole, _, _ = await ask(session, sim, USER)
    cut = len(whole) // 3
    prefill = whole[:cut].rstrip()
    rest, _, _ = await ask(
        session,
        sim,
        [*USER, {"role": "assistant", "content": prefill}],
        continue_final_message=True,
        add_generation_prompt=False,
    )
    assert prefill + rest == whole
    assert sim.records[-1].continuation == "prefill"


async def test_a_prefill_cut_mid_word_is_continued_mid_word(
    sim: SimServer, session: aiohttp.ClientSession
) -> None:
    whole, _, _ = await ask(session, sim, USER)
    cut = whole.index(" ", 20) - 2  # inside a word
    rest, _, _ = await ask(
        session, sim, [*USER, {"role": "assistant", "content": whole[:cut], "prefix": True}]
    )
    assert whole[:cut] + rest == whole


async def test_a_trailing_assistant_without_flags_gets_a_new_answer(
    sim: SimServer, session: aiohttp.ClientSession
) -> None:
    whole, _, _ = await ask(session, sim, USER)
    await ask(session, sim, [*USER, {"role": "assistant", "content": whole[:30]}])
    assert sim.records[-1].continuation is None


async def test_continue_final_message_with_a_generation_prompt_is_refused(
    sim: SimServer, session: aiohttp.ClientSession
) -> None:
    payload = {
        "model": "m",
        "messages": [*USER, {"role": "assistant", "content": "The"}],
        "continue_final_message": True,
    }
    async with session.post(sim.base_url + CHAT, json=payload) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert error["param"] == "continue_final_message"


async def test_a_llama_like_model_continues_by_default_and_echoes_the_prefill(
    sim: SimServer, session: aiohttp.ClientSession
) -> None:
    whole, _, _ = await ask(session, sim, USER, model="llama")
    prefill = whole[: len(whole) // 2].rstrip()
    text, deltas, _ = await ask(
        session, sim, [*USER, {"role": "assistant", "content": prefill}], model="llama"
    )
    assert deltas[0].startswith(prefill)
    assert text == whole  # the echo plus the continuation


async def test_appended_turns_are_recognized_and_continued(
    sim: SimServer, session: aiohttp.ClientSession
) -> None:
    whole, _, _ = await ask(session, sim, USER)
    one, two = whole[:25], whole[25:60]
    messages = [
        *USER,
        {"role": "assistant", "content": one},
        {"role": "user", "content": f"Some news.\n\n{CONTINUE}"},
        {"role": "assistant", "content": two},
        {"role": "user", "content": f"More news.\n\n{CONTINUE}"},
    ]
    rest, _, _ = await ask(session, sim, messages)
    assert one + two + rest == whole
    assert sim.records[-1].continuation == "turns"


async def test_the_prefix_cache_serves_an_extended_prompt_but_not_one_changed_in_the_middle(
    sim: SimServer, session: aiohttp.ClientSession
) -> None:
    references = "Draft one says this. " * 200  # about 1,000 tokens
    first = [{"role": "user", "content": QUESTION + references}]
    _, _, usage = await ask(session, sim, first, model="slow-prefill")
    assert usage["prompt_tokens_details"]["cached_tokens"] == 0
    cold_ttft = sim.records[-1].scheduled_ttft_s
    # appended to the end: everything before is served from the cache
    appended = [{"role": "user", "content": QUESTION + references + "Draft two adds this."}]
    _, _, usage = await ask(session, sim, appended, model="slow-prefill")
    assert usage["prompt_tokens_details"]["cached_tokens"] >= usage["prompt_tokens"] - 32
    warm_ttft = sim.records[-1].scheduled_ttft_s
    # grown in the middle (a reference that got longer): only the part before it is cached
    middle = [{"role": "user", "content": QUESTION + "Draft one grew. " + references}]
    _, _, usage = await ask(session, sim, middle, model="slow-prefill")
    assert usage["prompt_tokens_details"]["cached_tokens"] < 32
    broken_ttft = sim.records[-1].scheduled_ttft_s
    assert cold_ttft is not None and warm_ttft is not None and broken_ttft is not None
    assert warm_ttft < 0.1 < 0.9 < broken_ttft
    assert cold_ttft > 0.9
    # other models have caches of their own
    _, _, usage = await ask(session, sim, appended, model="m")
    assert usage["prompt_tokens_details"]["cached_tokens"] == 0


def test_the_cache_works_in_whole_blocks_and_forgets_the_least_recently_used() -> None:
    cache = PrefixCache(max_blocks=4)
    a = "a" * 64 * 3
    assert cache.serve(a) == 0
    assert cache.serve(a + "b" * 10) == 64 * 3
    assert cache.serve("c" * 64 * 3) == 0  # evicts two of a's blocks
    assert cache.serve(a) < 64 * 3
    assert render_prompt([("user", "Hi"), ("assistant", "He")], open_last=True).endswith("He")


async def test_each_step_answers_from_the_references_it_sees(
    sim: SimServer, session: aiohttp.ClientSession
) -> None:
    """An aggregator continuing its answer writes the answer line from what the step that
    writes it shows; an answer line written in an earlier step stays."""
    question = QUESTIONS[4]
    right = f"Answer: {question.answer}"
    base = [{"role": "user", "content": question.prompt}]
    # (the first step's prompt is longer than the anchor, as an aggregator's always is)
    drafts = "\n\nDraft: still thinking" + " ..." * 200
    early = [{"role": "user", "content": question.prompt + drafts}]
    whole, _, _ = await ask(session, sim, early, model="agg")
    assert extract_answer(whole) != question.answer  # accuracy 0, nothing visible
    # the next step sees two drafts agreeing on the right answer: its answer line follows them
    prefill = whole[:20].rstrip()
    seen = base[0]["content"] + drafts + f"\n\n{right}\n\n{right}"
    rest, _, _ = await ask(
        session,
        sim,
        [{"role": "user", "content": seen}, {"role": "assistant", "content": prefill}],
        model="agg",
        continue_final_message=True,
        add_generation_prompt=False,
    )
    assert extract_answer(prefill + rest) == question.answer
    assert (prefill + rest)[:40] == whole[:40]  # one planned text
