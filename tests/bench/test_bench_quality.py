"""Scoring: exact answers read leniently from real models' text, and the judge's score."""

from __future__ import annotations

import pytest

from moa_stream.bench.quality import (
    BenchQuestion,
    extract_number,
    is_correct,
    judge_score,
    parse_score,
    quiz_questions,
)
from moa_stream.engine import Agent
from moa_stream.sim.quiz import QUESTIONS
from moa_stream.testing import Script, ScriptedProvider


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("So 12 + 30 = 42.\nAnswer: 42", 42),
        ("**Answer:** 1,234", 1234),
        ("answer = -7", -7),
        ("First answer: 3. On reflection...\nFinal answer: 5", 5),
        ("Answer: 42.0", 42),
        ("No conclusion here.", None),
    ],
)
def test_extract_number(text: str, expected: int | None) -> None:
    assert extract_number(text) == expected


def test_quiz_questions_are_scored_with_the_simulators_rule() -> None:
    q = quiz_questions(1)[0]
    assert q.quiz and q.id == QUESTIONS[0].id
    assert is_correct(f"words\nAnswer: {q.answer}", q)
    assert not is_correct(f"Answer: {q.answer + 1}", q)
    assert is_correct("anything", BenchQuestion("P1", "open-ended")) is None


def test_quiz_questions_past_the_quiz_get_distinct_prompts() -> None:
    questions = quiz_questions(len(QUESTIONS) + 2)
    assert len({q.prompt for q in questions}) == len(questions)
    assert questions[len(QUESTIONS)].id == QUESTIONS[0].id


def test_parse_score() -> None:
    assert parse_score("Score: 10") == 1.0
    assert parse_score("score: 1") == 0.0
    assert parse_score("Score: 7") == pytest.approx(6 / 9)
    assert parse_score("Score: 99") == 1.0
    assert parse_score("I liked it.") is None


async def test_judge_score_asks_the_judge_and_reads_its_score() -> None:
    provider = ScriptedProvider({"judge": Script(tokens=("Score", ": ", "8"))})
    judge = Agent("judge", provider, "judge")
    assert await judge_score(judge, "Why is the sky blue?", "Rayleigh scattering.") == (
        pytest.approx(7 / 9)
    )
    (request,) = provider.requests
    assert "Rayleigh scattering." in request.messages[-1]["content"]
    assert request.temperature == 0.0
