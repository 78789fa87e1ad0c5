"""The quiz quality model: gold answers, seeded accuracy, aggregation by visible majority."""

from __future__ import annotations

import random

import aiohttp
import orjson
import pytest
from support.sim import CHAT, SIM_MODELS

from moa_stream.sim import SimModel, SimServer
from moa_stream.sim.quiz import (
    QUESTIONS,
    choose_answer,
    compose_answer_tokens,
    extract_answer,
    find_question,
    get_question,
    own_answer,
    score,
    visible_answers,
    wrong_answer,
)

# The simulator fixture: two fast models, "m" and "other".
pytestmark = pytest.mark.moa_sim(*SIM_MODELS, seed=0)

Q = get_question("Q17")


def test_the_quiz_is_fixed_unique_and_well_formed() -> None:
    assert len(QUESTIONS) == 120
    assert [q.id for q in QUESTIONS] == [f"Q{i}" for i in range(1, 121)]
    assert len({q.text for q in QUESTIONS}) == 120
    assert all(isinstance(q.answer, int) and q.answer >= 0 for q in QUESTIONS)
    # The numbers come from a fixed hash: this pins them on every machine.
    assert get_question("Q1") == QUESTIONS[0]
    assert QUESTIONS[0].text.startswith("A baker bakes 5 trays of 7 rolls each")
    assert QUESTIONS[0].answer == 27
    for q in QUESTIONS:
        assert "Answer:" not in q.text


def test_templates_compute_their_answers() -> None:
    q = next(q for q in QUESTIONS if q.text.startswith("A train travels at"))
    words = q.text.split()
    speed, hours = int(words[4]), int(words[9])
    assert q.answer == speed * hours


def test_questions_are_found_by_tag_or_exact_text() -> None:
    assert find_question(Q.prompt) is Q
    assert find_question(f"Please solve [{Q.id}] now") is Q
    assert find_question(f"Context.\n{Q.text}\nThanks") is Q
    assert find_question("[Q999] no such question") is None
    assert find_question("What is the capital of France?") is None
    later = get_question("Q40")
    assert find_question(f"{Q.text} and then {later.text}") is Q


def test_extract_answer_takes_the_last_answer_line() -> None:
    assert extract_answer("Some text.\nAnswer: 42") == 42
    assert extract_answer("Answer: 1\nthen Answer: -3") == -3
    assert extract_answer("no answer here") is None
    assert extract_answer("Some text.\nAnswer: ") is None
    assert visible_answers("Answer: 1 ... Answer: 2\nAnswer:3") == [1, 2, 3]
    assert score(f"work\nAnswer: {Q.answer}", Q)
    assert score(f"work\nAnswer: {Q.answer}", Q.id)
    assert not score(f"work\nAnswer: {Q.answer + 1}", Q)


def test_accuracy_one_is_always_right_and_zero_always_wrong() -> None:
    for q in QUESTIONS:
        for sample in (None, 1, 2):
            right = own_answer(q, model="m", seed=0, sample=sample, accuracy=1.0)
            wrong = own_answer(q, model="m", seed=0, sample=sample, accuracy=0.0)
            assert right == q.answer
            assert wrong == wrong_answer(q, "m") != q.answer


def test_accuracy_is_a_probability_over_questions_and_samples() -> None:
    right = sum(
        own_answer(q, model="m", seed=0, sample=s, accuracy=0.7) == q.answer
        for q in QUESTIONS
        for s in range(5)
    )
    assert 0.62 < right / (len(QUESTIONS) * 5) < 0.78


def test_models_are_wrong_differently() -> None:
    same = sum(wrong_answer(q, "a") == wrong_answer(q, "b") for q in QUESTIONS)
    assert same < len(QUESTIONS) // 4
    assert all(wrong_answer(q, "a") == wrong_answer(q, "a") for q in QUESTIONS)


def test_aggregator_takes_the_majority_of_visible_answers() -> None:
    wrong = Q.answer + 5
    prompt = f"{Q.prompt}\n1: x\nAnswer: {wrong}\n2: y\nAnswer: {wrong}\n3: z\nAnswer: {Q.answer}"
    for accuracy in (0.0, 1.0):
        got = choose_answer(Q, prompt, model="agg", seed=0, sample=None, accuracy=accuracy)
        assert got == wrong
    prompt = f"{Q.prompt}\nAnswer: {Q.answer}\nAnswer: {Q.answer}\nAnswer: {wrong}"
    assert choose_answer(Q, prompt, model="agg", seed=0, sample=None, accuracy=0.0) == Q.answer


def test_aggregator_breaks_ties_and_silence_with_its_own_roll() -> None:
    tie = f"{Q.prompt}\nAnswer: {Q.answer + 1}\nAnswer: {Q.answer + 2}"
    assert choose_answer(Q, tie, model="agg", seed=0, sample=None, accuracy=1.0) == Q.answer
    assert choose_answer(Q, tie, model="agg", seed=0, sample=None, accuracy=0.0) == wrong_answer(
        Q, "agg"
    )
    alone = choose_answer(Q, Q.prompt, model="agg", seed=0, sample=None, accuracy=1.0)
    assert alone == Q.answer


@pytest.mark.parametrize("answer_at", ["end", "start"])
def test_answer_position_decides_what_a_cut_reply_holds(answer_at: str) -> None:
    tokens = compose_answer_tokens(random.Random(0), 30, 77, answer_at)  # type: ignore[arg-type]
    assert len(tokens) == 30
    assert extract_answer("".join(tokens)) == 77
    cut = "".join(tokens[:-1])
    assert extract_answer(cut) == (None if answer_at == "end" else 77)
    assert extract_answer("".join(tokens[:2])) == (None if answer_at == "end" else 77)


async def _ask(
    session: aiohttp.ClientSession,
    sim: SimServer,
    model: str,
    messages: list[dict[str, str]],
    **kw: object,
) -> str:
    payload = {"model": model, "messages": messages, **kw}
    async with session.post(sim.base_url + CHAT, json=payload) as resp:
        assert resp.status == 200
        data = orjson.loads(await resp.read())
    text: str = data["choices"][0]["message"]["content"]
    return text


async def test_served_models_answer_with_their_accuracy(session: aiohttp.ClientSession) -> None:
    models = [
        SimModel(name="oracle", accuracy=1.0, answer_tokens=12),
        SimModel(name="dunce", accuracy=0.0, answer_tokens=12),
    ]
    async with SimServer(models) as sim:
        for q in QUESTIONS[:10]:
            user = [{"role": "user", "content": q.prompt}]
            assert score(await _ask(session, sim, "oracle", user), q)
            assert not score(await _ask(session, sim, "dunce", user), q)
        assert sim.records[0].question_id == QUESTIONS[0].id
        assert sim.records[0].answer == QUESTIONS[0].answer


async def test_served_aggregator_follows_the_references_it_is_given(
    session: aiohttp.ClientSession,
) -> None:
    models = [
        SimModel(name="oracle", accuracy=1.0, answer_tokens=12),
        SimModel(name="dunce", accuracy=0.0, answer_tokens=12),
        SimModel(name="agg", accuracy=0.0, answer_tokens=12),
    ]
    async with SimServer(models) as sim:
        user = {"role": "user", "content": Q.prompt}
        good = await _ask(session, sim, "oracle", [user])
        bad = await _ask(session, sim, "dunce", [user])
        refs = f"Responses from other models:\n1. {good}\n2. {good}\n3. {bad}"
        text = await _ask(session, sim, "agg", [{"role": "system", "content": refs}, user])
        assert score(text, Q)
        # Given only the wrong reference, the aggregator repeats it.
        refs = f"Responses from other models:\n1. {bad}"
        text = await _ask(session, sim, "agg", [{"role": "system", "content": refs}, user])
        assert extract_answer(text) == extract_answer(bad)


async def test_a_truncated_reply_with_the_answer_at_the_end_has_no_answer(
    session: aiohttp.ClientSession,
) -> None:
    async with SimServer([SimModel(name="m", accuracy=1.0, answer_tokens=20)]) as sim:
        user = [{"role": "user", "content": Q.prompt}]
        assert score(await _ask(session, sim, "m", user), Q)
        assert extract_answer(await _ask(session, sim, "m", user, max_tokens=19)) is None


async def test_request_seeds_vary_the_sample(session: aiohttp.ClientSession) -> None:
    async with SimServer([SimModel(name="m", accuracy=0.5, answer_tokens=6)]) as sim:
        user = [{"role": "user", "content": Q.prompt}]
        results = {score(await _ask(session, sim, "m", user, seed=s), Q) for s in range(20)}
        texts = {await _ask(session, sim, "m", user, seed=s) for s in range(3)}
    assert results == {True, False}
    assert len(texts) == 3


async def test_prompts_without_a_question_get_plain_text(session: aiohttp.ClientSession) -> None:
    async with SimServer([SimModel(name="m", answer_tokens=30)]) as sim:
        text = await _ask(session, sim, "m", [{"role": "user", "content": "Tell me a story."}])
        assert extract_answer(text) is None
        assert sim.records[0].question_id is None
