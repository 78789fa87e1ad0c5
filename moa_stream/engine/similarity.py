"""Cheap agreement measures between proposers' answers, for cutting refinement layers.

A similarity is any callable ``(a: str, b: str) -> float`` in [0, 1]; :func:`agreement` averages
it over every pair. The built-ins cost microseconds, which matters because the check runs
between a layer's decision and the next step (and only when another layer could be cut).

:func:`conclusion_match` (the default) compares what two answers *conclude*, not the words they
use on the way: answers that reason alike but end on 84 and 85 disagree; "It is safe" and "It is
not safe" disagree. Its limits: it sees one conclusion per answer (the explicitly marked final
answer, else the last number, else the last sentence that is not a pleasantry), so two answers
that conclude the same thing in different words disagree (a missed cut costs a layer, never a
wrong answer), and it cannot tell whether the reasoning behind equal conclusions is sound.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Sequence

__all__ = [
    "Similarity",
    "agreement",
    "conclusion",
    "conclusion_match",
    "final_line_match",
    "word_jaccard",
]

Similarity = Callable[[str, str], float]

_WORD = re.compile(r"\w+")
_MARKED = re.compile(
    r"(?:\\boxed\{([^{}]*)\}|####\s*([^\n]+)|"
    r"(?:final answer\s*(?:is|:|=)?|the answer is|\banswer\s*[:=])\s*\**\s*([^\n]+))",
    re.IGNORECASE,
)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_SENTENCE = re.compile(r"[^.!?\n]+")
_PLEASANTRY = re.compile(
    r"^(hope (this|that) helps|let me know|feel free|i hope|happy to help|good luck|thanks|"
    r"thank you|cheers)",
)


def word_jaccard(a: str, b: str) -> float:
    """Jaccard index of the two texts' lower-cased word sets (0.0 when either is empty: an
    empty answer agrees with nothing). Fooled by answers that share their words but not their
    conclusion; prefer :func:`conclusion_match`."""
    sa = set(_WORD.findall(a.lower()))
    sb = set(_WORD.findall(b.lower()))
    if not sa or not sb:
        return 0.0
    return len(sa & sb) / len(sa | sb)


def _final_line(text: str) -> str:
    for line in reversed(text.strip().splitlines()):
        words = _WORD.findall(line.lower())
        if words and not _PLEASANTRY.match(" ".join(words)):
            return " ".join(words)
    return ""


def final_line_match(a: str, b: str) -> float:
    """1.0 when both answers end on the same last line (case and punctuation ignored; closing
    pleasantries such as "Hope this helps!" skipped), else 0.0."""
    fa, fb = _final_line(a), _final_line(b)
    return 1.0 if fa and fa == fb else 0.0


def _normalize(text: str) -> str:
    return " ".join(_WORD.findall(text.lower()))


def conclusion(text: str) -> str:
    """What an answer concludes, normalized: its marked final answer (``\\boxed{}``, ``####``,
    "the answer is ..."), else its last number, else its last sentence that is not a
    pleasantry. Empty when there is none."""
    marked = list(_MARKED.finditer(text))
    if marked:
        m = marked[-1]
        value: str = next(g for g in m.groups() if g is not None)
        found: list[str] = _NUMBER.findall(value)
        return found[0].replace(",", "") if found else _normalize(value)
    numbers = _NUMBER.findall(text)
    if numbers:
        last: str = numbers[-1]
        return last.replace(",", "")
    for sentence in reversed(_SENTENCE.findall(text)):
        words = _normalize(sentence)
        if words and not _PLEASANTRY.match(words):
            return words
    return ""


def conclusion_match(a: str, b: str) -> float:
    """1.0 when both answers reach the same :func:`conclusion`, else 0.0."""
    ca, cb = conclusion(a), conclusion(b)
    return 1.0 if ca and ca == cb else 0.0


def agreement(texts: Sequence[str], similarity: Similarity = conclusion_match) -> float | None:
    """Mean pairwise similarity of ``texts``; ``None`` when there are fewer than two."""
    if len(texts) < 2:
        return None
    pairs = list(itertools.combinations(texts, 2))
    return sum(similarity(a, b) for a, b in pairs) / len(pairs)
