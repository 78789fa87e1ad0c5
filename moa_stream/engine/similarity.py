"""Cheap agreement measures between proposers' answers, for cutting refinement layers.

A similarity is any callable ``(a: str, b: str) -> float`` in [0, 1]; :func:`agreement` averages
it over every pair. The built-ins cost microseconds, which matters because the check runs
between a layer's decision and the next step.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Sequence

__all__ = ["Similarity", "agreement", "final_line_match", "word_jaccard"]

Similarity = Callable[[str, str], float]

_WORD = re.compile(r"\w+")


def word_jaccard(a: str, b: str) -> float:
    """Jaccard index of the two texts' lower-cased word sets."""
    sa = set(_WORD.findall(a.lower()))
    sb = set(_WORD.findall(b.lower()))
    if not sa and not sb:
        return 1.0
    return len(sa & sb) / len(sa | sb)


def _final_line(text: str) -> str:
    for line in reversed(text.strip().splitlines()):
        words = _WORD.findall(line.lower())
        if words:
            return " ".join(words)
    return ""


def final_line_match(a: str, b: str) -> float:
    """1.0 when both answers end on the same last line (case and punctuation ignored), else 0.0:
    answers that state a conclusion last agree when the conclusions do."""
    fa, fb = _final_line(a), _final_line(b)
    return 1.0 if fa and fa == fb else 0.0


def agreement(texts: Sequence[str], similarity: Similarity = word_jaccard) -> float | None:
    """Mean pairwise similarity of ``texts``; ``None`` when there are fewer than two."""
    if len(texts) < 2:
        return None
    pairs = list(itertools.combinations(texts, 2))
    return sum(similarity(a, b) for a, b in pairs) / len(pairs)
