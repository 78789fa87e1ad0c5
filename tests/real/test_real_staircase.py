"""The staircase end to end on llama-server: its aggregator continues its own answer by
assistant prefill, and llama-server repeats the prefilled text at the start of each
continuation, which the staircase must strip so that the client reads every part once.

Runs with a version of the library that has the staircase (``moa_stream.engine.staircase``).
"""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("moa_stream.engine.staircase", reason="needs the staircase aggregator")

from realhelpers import moa_config, moa_serve, progress_stream

from moa_stream.testing.llamacpp import InferenceServer

pytestmark = [pytest.mark.real, pytest.mark.timeout(300)]

#: A question whose answers run long, so that the proposers still write while the aggregator
#: takes its first steps.
LONG_QUESTION = "Explain in detail, step by step, how a bicycle is built and how to ride one."

STAIRS = """
[moa.stairs]
proposers = ["p1", "p2", "p3"]
aggregator = "agg"
policy = "partial(2, min_tokens=8)"
staircase = { steps = [8, 16, 32], lead = 8, continuation = "prefill" }
"""


async def test_staircase_continues_by_prefill_without_repeating_itself(
    llama: InferenceServer,
) -> None:
    config = moa_config(
        {"llama": llama.base_url},
        {"p1": ("llama", 160), "p2": ("llama", 160), "p3": ("llama", 160), "agg": ("llama", 96)},
        STAIRS,
        provider_lines='continuation = ["prefill:llama", "turns"]\n',
    )

    def ignore(item: dict[str, Any]) -> None:
        return None

    with moa_serve(config) as serve:
        status, text, items, errors = await progress_stream(
            serve.url, "stairs", ignore, [{"role": "user", "content": LONG_QUESTION}]
        )
    assert status == 200
    steps = [i for i in items if i["type"] == "aggregator.step"]
    assert len(steps) >= 2, [i["type"] for i in items]
    assert all(s["continuation"].startswith("prefill") for s in steps)
    # Each later step was asked with the answer so far as a prefill. Had its echo gone to the
    # client, the answer would hold that text twice, the second time right where it was cut.
    checked = [s["answer_chars"] for s in steps[1:] if s["answer_chars"] >= 8]
    assert checked, steps
    for done in checked:
        assert not text[done:].startswith(text[:done]), (done, text)
    assert not errors
    assert text.strip()


#: Open-ended questions: the kind of prompt on which a small aggregator restarted its answer,
#: copied the drafts' tags into it or stopped early when asked to continue.
OPEN_QUESTIONS = (
    "Explain why the sky is blue.",
    "What are three tips for staying healthy?",
    "How do plants make their food?",
    "Why do we have seasons on Earth?",
)

WHOLE = """
[moa.single]
preset = "single"
aggregator = "agg"

[moa.wait-all]
proposers = ["p1", "p2", "p3"]
aggregator = "agg"
policy = "wait_all"

[moa.stairs-prefill]
proposers = ["p1", "p2", "p3"]
aggregator = "agg"
policy = "partial(2, min_tokens=8) | deadline(0.5, min_k=1, partial=true)"
staircase = { continuation = "prefill", context_window = 1024 }

[moa.stairs-turns]
proposers = ["p1", "p2", "p3"]
aggregator = "agg"
policy = "partial(2, min_tokens=8) | deadline(0.5, min_k=1, partial=true)"
staircase = { continuation = "turns", context_window = 1024 }
"""


@pytest.mark.parametrize("method", ["prefill", "turns"])
async def test_staircase_answers_stay_whole_on_a_small_model(
    llama: InferenceServer, method: str
) -> None:
    """What a reader would notice: no copied prompt markup, no more restarts or loops per
    answer than the reference MoA's (wait-all, the same drafts finished) plus one, an answer of
    about the one-shot length, a stream that ends, and no error; with the default steps, lead,
    pause and guard."""
    import aiohttp

    from moa_stream.bench.integrity import answer_integrity, chat_template_texts, word_count

    # The server's default system prompt, from its chat template: an answer that copies it
    # copies its prompt.
    root = llama.base_url.removesuffix("/v1")
    async with aiohttp.ClientSession() as session, session.get(f"{root}/props") as response:
        template = (await response.json()).get("chat_template") or ""
    texts = chat_template_texts(template)

    config = moa_config(
        {"llama": llama.base_url},
        {"p1": ("llama", 96), "p2": ("llama", 96), "p3": ("llama", 96), "agg": ("llama", 160)},
        WHOLE,
        provider_lines='continuation = ["prefill:llama", "turns"]\n',
    )

    def ignore(item: dict[str, Any]) -> None:
        return None

    rows = []
    with moa_serve(config) as serve:
        for question in OPEN_QUESTIONS:
            messages = [{"role": "user", "content": question}]
            _, one_shot, _, _ = await progress_stream(serve.url, "single", ignore, messages)
            _, waited, _, _ = await progress_stream(serve.url, "wait-all", ignore, messages)
            status, text, items, errors = await progress_stream(
                serve.url, f"stairs-{method}", ignore, messages
            )
            assert status == 200 and not errors, (question, errors)
            assert any(i["type"] == "run.done" for i in items)
            alone = answer_integrity(one_shot, prompt_texts=texts)
            reference = answer_integrity(waited, prompt_texts=texts)
            mine = answer_integrity(text, one_shot_words=word_count(one_shot), prompt_texts=texts)
            rows.append((question, alone, mine, text, reference))
    for question, _, mine, text, _ in rows:
        assert not mine.markup, (question, mine.markup, text)
    # On this model an answer written from a sentence or two of each draft often loops: the
    # repetition gate ends it at its second restart or repeat in a row, and after such an
    # early start the next runs start on finished drafts (docs/real-inference.md). Measured
    # per answer against the reference MoA's, as the model restarts with finished drafts too.
    n = len(rows)
    restarts = [(q, m.restarts, w.restarts) for q, _, m, _, w in rows]
    assert sum(r[1] for r in restarts) <= sum(r[2] for r in restarts) + n, restarts
    # A list whose items go on alike ("The fifth tip is to stay away from ...") opens each
    # sentence differently: its loops are counted by their bodies.
    loops = [(q, m.loops, w.loops) for q, _, m, _, w in rows]
    assert sum(r[1] for r in loops) <= sum(r[2] for r in loops) + n, loops
    # Length: the staircase's answers together at least 0.8 of the reference MoA's (the
    # model's answers vary in length from one request to the next). Kept visible when not met:
    # an answer the gate ends at a loop is two or three sentences long.
    mine, waited = sum(m.words for _, _, m, _, _ in rows), sum(w.words for *_, w in rows)
    alone = sum(a.words for _, a, _, _, _ in rows)
    if mine < 0.8 * waited:
        pytest.xfail(f"answers {mine} words against wait-all's {waited} (one-shot: {alone})")
