"""Quality, measured: questions with exact answers, scored exactly; optionally an LLM judge.

Offline (simulated upstream), the questions are the simulator's quiz
(:mod:`moa_stream.sim.quiz`): each simulated model answers correctly with its ``accuracy``, and
a simulated aggregator gives the majority of the answers it can see in its prompt (a partial
reference that has not reached its ``Answer: N`` line yet shows none). So a run's final answer is
right or wrong according to exactly which references it was given. It illustrates the trade
between waiting and answering early; it is not a claim about how real models reason.

Against real endpoints, the questions are :func:`arithmetic_questions`: thirty word problems
shipped with the package, whose prompts ask for a final line ``Answer: N``, scored exactly. For
open-ended prompts (no exact answer), :func:`judge_score` asks a judge model for a 1-10 rating.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import orjson

from moa_stream._exceptions import ProviderError
from moa_stream._types import ChatMessage
from moa_stream.engine.spec import Agent
from moa_stream.sim import quiz

__all__ = [
    "BenchQuestion",
    "arithmetic_questions",
    "extract_number",
    "is_correct",
    "judge_score",
    "load_prompts",
    "load_questions",
    "parse_score",
    "quiz_questions",
]

ANSWER_FORMAT = "Work it out briefly, then give the final line in the form 'Answer: <number>'."


@dataclass(frozen=True, slots=True)
class BenchQuestion:
    """One prompt of a benchmark: ``answer`` is the exact integer answer, ``None`` for an
    open-ended prompt (judged, if a judge is given). ``quiz`` marks the simulator's quiz,
    scored with its own rule."""

    id: str
    prompt: str
    answer: int | None = None
    quiz: bool = False


def quiz_questions(n: int) -> list[BenchQuestion]:
    """``n`` questions of the simulator's quiz, in order, each run's prompt distinct.

    Past the quiz's length the questions repeat with a suffix that makes the prompt distinct
    (the simulator schedules a repeated request differently, which would put the oracle off);
    the simulated models answer a repeated question as before, so a repeat adds timing samples,
    not quality ones.
    """
    questions = quiz.QUESTIONS
    out = []
    for i in range(n):
        q = questions[i % len(questions)]
        suffix = "" if i < len(questions) else f"\n(Request {i + 1}.)"
        out.append(BenchQuestion(q.id, q.prompt + suffix, q.answer, quiz=True))
    return out


def _from_json(data: Any, source: str) -> list[BenchQuestion]:
    items = data.get("questions") if isinstance(data, dict) else data
    if not isinstance(items, list) or not items:
        raise ValueError(f"{source}: expected a non-empty list of questions")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("text"), str):
            raise ValueError(f"{source}: question {i} needs a 'text' string")
        answer = item.get("answer")
        if answer is not None and (isinstance(answer, bool) or not isinstance(answer, int)):
            raise ValueError(f"{source}: question {i}: 'answer' must be an integer")
        qid = str(item.get("id", f"{i + 1}"))
        text = item["text"]
        prompt = f"{text}\n{ANSWER_FORMAT}" if answer is not None else text
        out.append(BenchQuestion(qid, prompt, answer))
    return out


def arithmetic_questions() -> list[BenchQuestion]:
    """The shipped set: thirty arithmetic word problems with exact integer answers."""
    raw = resources.files("moa_stream.bench").joinpath("data/arithmetic.json").read_bytes()
    return _from_json(orjson.loads(raw), "arithmetic.json")


def load_questions(path: str | Path) -> list[BenchQuestion]:
    """Questions from a JSON file: a list (or ``{"questions": [...]}``) of objects with
    ``text`` and an integer ``answer`` (``id`` optional). Without ``answer`` a question is
    open-ended."""
    source = str(path)
    try:
        data = orjson.loads(Path(path).read_bytes())
    except (OSError, orjson.JSONDecodeError) as exc:
        raise ValueError(f"{source}: {exc}") from None
    return _from_json(data, source)


def load_prompts(path: str | Path) -> list[BenchQuestion]:
    """Open-ended prompts, one per non-empty line of a text file."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return [BenchQuestion(f"P{i + 1}", p) for i, p in enumerate(prompts)]


# Real models dress the final line up ("**Answer:** 1,234", "answer = 42"); accept that, and take
# the last one, since a model may restate intermediate results before concluding.
_NUMBER_ANSWER = re.compile(r"answer\W{0,6}?(-?\d[\d,]*(?:\.0+)?)\b", re.IGNORECASE)


def extract_number(text: str) -> int | None:
    """The integer on the last ``Answer: N`` line of ``text`` (lenient about markup)."""
    matches = _NUMBER_ANSWER.findall(text)
    if not matches:
        return None
    digits = matches[-1].replace(",", "").split(".")[0]
    try:
        return int(digits)
    except ValueError:
        return None


def is_correct(text: str, question: BenchQuestion) -> bool | None:
    """Whether ``text`` answers ``question`` exactly; ``None`` for an open-ended question."""
    if question.answer is None:
        return None
    if question.quiz:
        # The simulator's own rule: the last "Answer: N" in the text.
        return quiz.extract_answer(text) == question.answer
    return extract_number(text) == question.answer


JUDGE_SYSTEM = (
    "You grade answers. Judge the response below for correctness, helpfulness and clarity as "
    "an answer to the user's prompt. Be strict: a wrong or evasive answer scores low."
)
JUDGE_USER = (
    "Prompt:\n{prompt}\n\nResponse:\n{response}\n\nRate the response from 1 (useless) to 10 "
    "(excellent). Reply with one line of the form 'Score: <1-10>' and nothing else."
)
_SCORE = re.compile(r"score\W{0,4}?(\d+(?:\.\d+)?)", re.IGNORECASE)


def parse_score(text: str) -> float | None:
    """A judge's ``Score: N`` (1-10) mapped onto 0..1; ``None`` if there is none."""
    matches = _SCORE.findall(text)
    if not matches:
        return None
    value = min(10.0, max(1.0, float(matches[-1])))
    return (value - 1.0) / 9.0


async def judge_score(judge: Agent, prompt: str, response: str) -> float | None:
    """Ask ``judge`` to rate ``response`` to ``prompt``; 0..1, or ``None`` if it would not say
    (or its request failed: a judge's failure must not count as a bad answer)."""
    messages: Sequence[ChatMessage] = [
        {"role": "system", "content": JUDGE_SYSTEM},
        {"role": "user", "content": JUDGE_USER.format(prompt=prompt, response=response)},
    ]
    parts: list[str] = []
    try:
        async with judge.provider.stream(judge.request(messages, temperature=0.0)) as stream:
            async for delta in stream:
                parts.append(delta.content)
    except ProviderError:
        return None
    return parse_score("".join(parts))


def unscored_warning(judged: int, scored: int, judge: str) -> str | None:
    """A loud line when some of the ``judged`` answers got no parsable score from the judge;
    ``None`` when all of them did. Unscored answers are left out of the quality figure rather
    than counted as bad, so without this line an unusable judge would look like no data."""
    missing = judged - scored
    if judged == 0 or missing == 0:
        return None
    share = "none" if scored == 0 else f"only {scored}"
    return (
        f"WARNING: the judge {judge!r} gave a usable 'Score: N' for {share} of {judged} answers; "
        f"the {missing} without one are left out of the quality figures. Check that the judge "
        "model follows the rating instruction (a stronger instruct model), or its errors."
    )
