"""Deterministic word-like text for simulated answers.

Text is built from a fixed vocabulary into sentences, one token per word: every token is a word
followed by a space (the last one has none), so one token is one SSE chunk on the wire and
``"".join(tokens)`` is the answer. The randomness comes from the caller's seeded
:class:`random.Random`, so the same seed gives the same text in every process.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

__all__ = ["VOCABULARY", "apply_stop", "count_prompt_tokens", "generate_tokens"]

# Common English and no names, so a model's name never shows up in its text by accident.
_WORDS = """
    the a an and or but so because when while after before then also still often
    each every some many most few more less other same new old good great small large
    long short high low early late first last next best better right clear simple
    strong quick slow open close full empty free busy ready able likely possible
    time year day week way part place case point group number fact system program
    question answer problem result reason method idea plan step order level model
    value state change rate cost price market team project process service data
    report record table list line page word story example detail choice option
    water light sound color paper stone river field city road house room door
    window garden table chair school office market station bridge tower island
    people person friend family worker teacher student doctor driver writer reader
    make take give find keep hold bring carry build write read learn teach show
    tell ask help move turn start stop begin end open close check test measure
    count add share send follow lead hold set run walk travel return reach pass
    seem feel look hear know think mean need want try use work call play live
    is are was were has have had can could will would should may might must does
    very quite rather almost nearly only just even again already always never
    here there now soon today together alone often usually certainly clearly
    of in on at by for with from into over under between through about across
    along around behind beyond during within without against toward upon
    this that these those it its they them their we our you your one two three
    several enough much such both either neither all any none
"""

#: Words the generator draws from.
VOCABULARY: tuple[str, ...] = tuple(dict.fromkeys(_WORDS.split()))

_MIN_SENTENCE = 5
_MAX_SENTENCE = 14
_COMMA_P = 0.08


def generate_tokens(rng: random.Random, n: int) -> list[str]:
    """``n`` tokens of sentence-shaped text drawn with ``rng``.

    Sentences start with a capital and end with a full stop; the last token has no trailing
    space and always closes its sentence, so any prefix of the text is well formed.
    """
    if n <= 0:
        return []
    vocab = VOCABULARY
    tokens: list[str] = []
    left_in_sentence = 0
    for _ in range(n):
        word = vocab[rng.randrange(len(vocab))]
        if left_in_sentence == 0:
            left_in_sentence = rng.randint(_MIN_SENTENCE, _MAX_SENTENCE)
            word = word.capitalize()
        left_in_sentence -= 1
        if left_in_sentence == 0:
            word += "."
        elif rng.random() < _COMMA_P:
            word += ","
        tokens.append(word + " ")
    last = tokens[-1].rstrip(" ,")
    tokens[-1] = last if last.endswith(".") else last + "."
    return tokens


def apply_stop(tokens: Sequence[str], stop: Iterable[str]) -> tuple[list[str], bool]:
    """Cut ``tokens`` before the earliest occurrence of any stop sequence.

    Returns the kept tokens (the one the stop sequence starts in is cut to the part before it;
    it is dropped when that part is empty) and whether a stop sequence matched. As with OpenAI,
    the stop sequence itself is not part of the output.
    """
    text = "".join(tokens)
    cut = -1
    for s in stop:
        if not s:
            continue
        pos = text.find(s)
        if pos != -1 and (cut == -1 or pos < cut):
            cut = pos
    if cut == -1:
        return list(tokens), False
    kept: list[str] = []
    used = 0
    for token in tokens:
        if used + len(token) <= cut:
            kept.append(token)
            used += len(token)
            continue
        head = token[: cut - used]
        if head:
            kept.append(head)
        break
    return kept, True


def count_prompt_tokens(texts: Iterable[str]) -> int:
    """Prompt tokens as the simulator counts them: about one per four characters, at least 1."""
    chars = sum(len(t) for t in texts)
    return max(1, -(-chars // 4))
