"""A quiz with known answers, and the quality model simulated models follow on it.

It exists so offline benchmarks can put a number on the trade Mixture-of-Agents makes between
waiting for proposers and answering early. It illustrates that trade; it is not a claim about
how real LLMs reason.

* :data:`QUESTIONS`: arithmetic word problems with exact integer answers, built from templates
  with numbers drawn from a fixed hash (identical on every machine and Python version).
* A prompt asks a question when it contains the question's tag (``[Q17]``) or its exact text.
* A model answering alone is right with probability ``accuracy`` (one roll per seed, model,
  question and sample); when wrong it gives ``gold + offset``, the offset fixed per model and
  question, so different models tend to be wrong differently.
* A model whose prompt already shows answers (``Answer: N`` anywhere in the messages) acts as an
  aggregator: it gives the most common answer it can see; on a tie it answers as it would
  alone. So its score reflects exactly what it was shown.
* Every quiz reply ends (or, for ``answer_at="start"``, begins) with the line ``Answer: N``; a
  reply cut short before that line carries no answer.
"""

from __future__ import annotations

import itertools
import random
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

from moa_stream.sim._rng import derive_seed, seeded_rng
from moa_stream.sim.textgen import generate_tokens

__all__ = [
    "QUESTIONS",
    "Question",
    "choose_answer",
    "compose_answer_tokens",
    "extract_answer",
    "find_question",
    "get_question",
    "own_answer",
    "score",
    "visible_answers",
    "wrong_answer",
]

AnswerAt = Literal["end", "start"]


@dataclass(frozen=True, slots=True)
class Question:
    """One quiz question: ``id`` (``"Q17"``), the problem ``text`` and its gold ``answer``."""

    id: str
    text: str
    answer: int

    @property
    def prompt(self) -> str:
        """The question as a user message: tag, text and the expected answer format."""
        return (
            f"[{self.id}] {self.text}\n"
            "Explain briefly, then give the final line in the form 'Answer: <number>'."
        )


_Draw = Callable[[int, int], int]
_Template = Callable[[_Draw], tuple[str, int]]


def _left_over(text: str, groups: tuple[int, int], size: tuple[int, int]) -> _Template:
    """The problem "``n`` groups of ``k``, ``taken`` of them gone: how many are left?", worded
    by ``text`` (with ``{n}``, ``{k}`` and ``{taken}``), ``n`` and ``k`` drawn in ``groups``
    and ``size``."""

    def template(d: _Draw) -> tuple[str, int]:
        n, k = d(*groups), d(*size)
        taken = d(2, n * k - 1)
        return text.format(n=n, k=k, taken=taken), n * k - taken

    return template


_bakery = _left_over(
    "A baker bakes {n} trays of {k} rolls each and sells {taken} rolls. How many rolls are left?",
    (3, 12),
    (6, 24),
)
_library = _left_over(
    "A library has {n} shelves with {k} books on each. {taken} books are on loan. "
    "How many books are still on the shelves?",
    (4, 30),
    (10, 60),
)
_cinema = _left_over(
    "A cinema has {n} rows of {k} seats, and {taken} seats are taken. How many seats are free?",
    (5, 30),
    (8, 40),
)


def _marbles(d: _Draw) -> tuple[str, int]:
    have, bags, per = d(5, 90), d(2, 9), d(3, 25)
    return (
        f"Mia has {have} marbles. She buys {bags} bags with {per} marbles in each bag. "
        "How many marbles does she have now?",
        have + bags * per,
    )


def _train(d: _Draw) -> tuple[str, int]:
    speed, hours = d(40, 160), d(2, 9)
    return (
        f"A train travels at {speed} kilometres per hour for {hours} hours. "
        "How many kilometres does it travel?",
        speed * hours,
    )


def _reading(d: _Draw) -> tuple[str, int]:
    pages, days, extra = d(8, 60), d(3, 14), d(2, 40)
    return (
        f"Tom reads {pages} pages a day for {days} days, then {extra} more pages. "
        "How many pages has he read in total?",
        pages * days + extra,
    )


def _eggs(d: _Draw) -> tuple[str, int]:
    hens, per, weeks = d(3, 25), d(2, 7), d(2, 8)
    return (
        f"A farmer has {hens} hens. Each hen lays {per} eggs a week. "
        f"How many eggs do the hens lay in {weeks} weeks?",
        hens * per * weeks,
    )


def _teams(d: _Draw) -> tuple[str, int]:
    teams, size = d(2, 12), d(3, 15)
    return (
        f"{teams * size} students are split equally into {teams} teams. "
        "How many students are in each team?",
        size,
    )


def _pens(d: _Draw) -> tuple[str, int]:
    price, count = d(15, 95), d(3, 20)
    discount = d(2, price * count // 2)
    return (
        f"A shop sells pens at {price} cents each. How many cents do {count} pens cost "
        f"after a discount of {discount} cents?",
        price * count - discount,
    )


def _tank(d: _Draw) -> tuple[str, int]:
    full, leak = d(100, 900), d(10, 90)
    added = d(5, 200)
    return (
        f"A tank holds {full} litres. {leak} litres leak out and then {added} litres are "
        "added. How many litres are in the tank now?",
        full - leak + added,
    )


def _apples(d: _Draw) -> tuple[str, int]:
    per, boxes, loose = d(6, 48), d(2, 15), d(2, 30)
    return (
        f"A box holds {per} apples. How many apples are there in {boxes} full boxes "
        f"and {loose} loose apples?",
        per * boxes + loose,
    )


def _sum(d: _Draw) -> tuple[str, int]:
    one, other = d(10, 500), d(10, 500)
    return (
        f"The sum of two numbers is {one + other} and one of them is {one}. "
        "What is the other number?",
        other,
    )


_TEMPLATES: tuple[_Template, ...] = (
    _bakery,
    _marbles,
    _train,
    _library,
    _reading,
    _eggs,
    _teams,
    _pens,
    _tank,
    _apples,
    _sum,
    _cinema,
)

_PER_TEMPLATE = 10


def _build_questions() -> tuple[Question, ...]:
    questions: list[Question] = []
    for i in range(len(_TEMPLATES) * _PER_TEMPLATE):
        template = _TEMPLATES[i % len(_TEMPLATES)]
        for attempt in itertools.count():
            counter = itertools.count()

            # Numbers come from a fixed hash, not random.Random, so the quiz is the same on
            # every Python version.
            def draw(
                lo: int, hi: int, i: int = i, attempt: int = attempt, c: Iterator[int] = counter
            ) -> int:
                return lo + derive_seed("quiz", i, attempt, next(c)) % (hi - lo + 1)

            text, answer = template(draw)
            # A question is found by its exact text, so none may contain another.
            if not any(text in q.text or q.text in text for q in questions):
                break
        questions.append(Question(id=f"Q{i + 1}", text=text, answer=answer))
    return tuple(questions)


#: The quiz: 120 questions, ``Q1`` to ``Q120``.
QUESTIONS: tuple[Question, ...] = _build_questions()

_BY_ID = {q.id: q for q in QUESTIONS}
_TAG_RE = re.compile(r"\[(Q\d+)\]")
_ANSWER_RE = re.compile(r"\bAnswer:[ \t]*(-?\d+)\b")


def get_question(question_id: str) -> Question:
    """The question with this id (``"Q17"``); ``KeyError`` if there is none."""
    return _BY_ID[question_id]


def find_question(text: str) -> Question | None:
    """The question ``text`` asks: by its first known ``[Qn]`` tag, else by the earliest exact
    question text in it; ``None`` if it asks none."""
    for match in _TAG_RE.finditer(text):
        question = _BY_ID.get(match.group(1))
        if question is not None:
            return question
    best: Question | None = None
    best_pos = len(text)
    for question in QUESTIONS:
        pos = text.find(question.text)
        if pos != -1 and pos < best_pos:
            best, best_pos = question, pos
    return best


def visible_answers(text: str) -> list[int]:
    """Every ``Answer: N`` in ``text``, in order."""
    return [int(m.group(1)) for m in _ANSWER_RE.finditer(text)]


def extract_answer(text: str) -> int | None:
    """The final answer in ``text``: the last ``Answer: N``, or ``None`` if there is none."""
    answers = visible_answers(text)
    return answers[-1] if answers else None


def score(text: str, question: Question | str) -> bool:
    """Whether ``text`` ends up at the gold answer of ``question`` (a :class:`Question` or id)."""
    if isinstance(question, str):
        question = get_question(question)
    return extract_answer(text) == question.answer


def wrong_answer(question: Question, model: str) -> int:
    """The answer ``model`` gives to ``question`` when it gets it wrong: the gold answer moved
    by an offset in ±1..9 fixed per (model, question), kept non-negative."""
    k = derive_seed("quiz-wrong", model, question.id) % 18
    offset = k - 9 if k < 9 else k - 8
    wrong = question.answer + offset
    return wrong if wrong >= 0 else question.answer - offset


def own_answer(
    question: Question, *, model: str, seed: int, sample: object, accuracy: float
) -> int:
    """The answer ``model`` gives on its own: gold with probability ``accuracy``, rolled once
    per (seed, model, question, sample), else :func:`wrong_answer`."""
    roll = seeded_rng("quiz-roll", seed, model, question.id, sample).random()
    return question.answer if roll < accuracy else wrong_answer(question, model)


def choose_answer(
    question: Question,
    prompt_text: str,
    *,
    model: str,
    seed: int,
    sample: object,
    accuracy: float,
) -> int:
    """The answer ``model`` gives when ``prompt_text`` (all messages) asks ``question``.

    With answers visible in the prompt it gives the most common one; on a tie, or with none
    visible, it gives :func:`own_answer`.
    """
    seen = visible_answers(prompt_text)
    if seen:
        ranked = Counter(seen).most_common()
        top = ranked[0][1]
        if len(ranked) == 1 or ranked[1][1] < top:
            return ranked[0][0]
    return own_answer(question, model=model, seed=seed, sample=sample, accuracy=accuracy)


def compose_answer_tokens(
    rng: random.Random, n: int, answer: int, answer_at: AnswerAt = "end"
) -> list[str]:
    """A quiz reply of ``max(n, 2)`` tokens: filler text plus the line ``Answer: N``, at the
    end (default) or at the start."""
    body: Sequence[str] = generate_tokens(rng, max(0, n - 2))
    if answer_at == "start":
        return ["Answer: ", f"{answer}\n" if body else str(answer), *body]
    return [*body, "\nAnswer: " if body else "Answer: ", str(answer)]
