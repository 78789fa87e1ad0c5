"""Whether an answer holds together, how smoothly it streamed, and what it cost.

TTFT alone rewards an aggregator that starts early and then stumbles. On a real small model a
staircase answer can restart itself ("The sky is blue. The sky is indeed blue, ..."), copy the
prompt's markup into the answer (``</draft>``), parrot the instructions, stop after a few
words, or stall for seconds between chunks. These functions put a number on each, from what a
caller sees: the answer's text and the times its content chunks arrived.

Everything here is pure and uses the standard library only (the default prompt templates are
imported from the engine on first use), so scripts that measure real servers can use it
without the benchmark's extras.

Cost is counted in units of one uncached input token under three stated price models
(:data:`PRICE_MODELS`); output tokens cost :data:`OUTPUT_PRICE` of those units in all three.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "MODEL_DEFAULT_TEXTS",
    "OUTPUT_PRICE",
    "PRICE_MODELS",
    "STALL_S",
    "Integrity",
    "PriceModel",
    "Smoothness",
    "answer_integrity",
    "bill",
    "bills",
    "chat_template_texts",
    "ended_early",
    "fresh_words",
    "inter_token_gaps",
    "loops",
    "restarts",
    "stream_gaps",
    "template_texts",
    "word_count",
]

#: A gap between two content chunks longer than this is a stall a reader notices.
STALL_S = 1.0

#: How many words of a sentence's opening identify it (a restart repeats them).
OPENING_WORDS = 4

#: How many consecutive words shared with the prompt's own text count as parroting: long
#: enough that ordinary phrases ("the answer to the question") do not match by chance.
PARROT_WORDS = 6

#: How many consecutive words a sentence must share with an earlier one to repeat it: a list
#: that loops ("The fifth tip is to stay away from the temptation of a glass of water. The
#: sixth tip is to stay away from the temptation of ...") opens each item differently, so only
#: its body shows the loop; eight words in a row is more than prose that is going somewhere
#: repeats by chance.
LOOP_WORDS = 8

#: Phrases with which an aggregator writes about its prompt instead of answering: the drafts
#: or notes it was given, the edits it made, "the message" it was shown ("Here is the edited
#: response:", "This draft is not complete yet.", "Your edits to the message have improved
#: it", "A note marked incomplete"). Counted only where the question does not use them itself.
_ABOUT_PROMPT = re.compile(
    r"\b(?:drafts?|drafted)\b"
    r"|\b(?:edited|revised|rewritten|improved)\s+(?:response|version|answer|message|text)\b"
    r"|\byour\s+edits\b"
    r"|\b(?:the|this|your|user's)\s+message\b"
    r"|\b(?:the|these|those|your)\s+notes\b"
    r"|\bnotes?\s+marked\b",
    re.IGNORECASE,
)

#: What ``ended_early`` compares an answer's length against: half the one-shot answer.
EARLY_RATIO = 0.5

_SENTENCE_END = re.compile(r"[.!?\n]+")
_APOSTROPHE = "\u2019"  # the typographic apostrophe, read as '
_WORD = re.compile(rf"[^\W_]+(?:['{_APOSTROPHE}][^\W_]+)*")

# Prompt markup that has no business in an answer: the draft tags of the reference block
# (a whole tag, attributes and all, where it is complete), a status attribute on its own, and
# chat-template control tokens (ChatML's <|im_start|>, Llama 3's <|eot_id|>, Mistral's [INST],
# Gemma's <start_of_turn>).
_MARKUP = re.compile(
    r"</?draft\b[^<>\n]{0,160}>?"
    r"|status=\"[^\"\n]{0,60}\"?"
    r"|<\|[^<>|\s]{0,40}\|?>?"
    r"|\[/?INST\]"
    r"|<(?:start|end)_of_turn>",
    re.IGNORECASE,
)


def _words(text: str) -> list[str]:
    return [w.lower().replace(_APOSTROPHE, "'") for w in _WORD.findall(text)]


def _stem(word: str) -> str:
    """``word`` without a plural or past ending: enough to match "drafts" and "drafted" with
    "draft", "notes" with "note"."""
    return word.removesuffix("s").removesuffix("ed")


def word_count(text: str) -> int:
    """Words in ``text``: runs of letters or digits (an apostrophe inside keeps one word)."""
    return len(_WORD.findall(text))


def _sentences(text: str) -> list[list[str]]:
    return [ws for part in _SENTENCE_END.split(text) if (ws := _words(part))]


def _restarting(sentences: list[list[str]]) -> list[bool]:
    """For each sentence, whether it restarts an earlier one (see :func:`restarts`)."""
    seen: set[tuple[str, ...]] = set()
    marks = []
    for words in sentences:
        if len(words) < OPENING_WORDS:
            marks.append(False)
            continue
        opening = tuple(words[:OPENING_WORDS])
        head = words[: OPENING_WORDS + 1]
        dropped = {
            tuple(head[:i] + head[i + 1 :])[:OPENING_WORDS]
            for i in range(len(head))
            if len(head) > OPENING_WORDS
        }
        marks.append(opening in seen or bool(dropped & seen))
        seen.add(opening)
    return marks


def _looping(sentences: list[list[str]], n: int = LOOP_WORDS) -> list[bool]:
    """For each sentence, whether it repeats ``n`` consecutive words of an earlier one, or of
    itself (a sentence that never ends: "the sky that is a result of the sky that is ...")."""
    seen: set[tuple[str, ...]] = set()
    marks = []
    for words in sentences:
        runs = len(words) - n + 1
        grams = {tuple(words[i : i + n]) for i in range(runs)}
        marks.append(bool(grams & seen) or len(grams) < runs)
        seen |= grams
    return marks


def restarts(answer: str) -> int:
    """Sentences of ``answer`` that start it over: whose opening words repeat an earlier
    sentence's.

    Sentences are split on ``.``, ``!``, ``?`` and line breaks; a sentence's opening is its
    first four words, lowercased, punctuation dropped. A sentence restarts when its opening is
    an earlier sentence's opening, or becomes one when a single word is taken out of its first
    five ("The sky is *indeed* blue" after "The sky is blue"): a model that starts over tends to
    insert a word the second time, and four identical words in a row plus one is still rare in
    prose that is going somewhere. Sentences shorter than four words (list numbers, "Yes.")
    are never counted, nor matched against.
    """
    return sum(_restarting(_sentences(answer)))


def loops(answer: str, n: int = LOOP_WORDS) -> int:
    """Sentences of ``answer`` that repeat a run of ``n`` consecutive words (lowercased,
    punctuation dropped) of an earlier sentence or of themselves: the body of a loop, where
    :func:`restarts` sees only openings. A sentence that restarts an earlier one and goes on to
    repeat it counts in both."""
    return sum(_looping(_sentences(answer), n))


def fresh_words(answer: str) -> int:
    """Words of ``answer`` in sentences that neither restart nor repeat an earlier one: its
    length without its repetitions, to compare answers that loop with answers that do not."""
    sentences = _sentences(answer)
    return _fresh(sentences, _restarting(sentences), _looping(sentences))


def _fresh(sentences: list[list[str]], restarting: list[bool], looping: list[bool]) -> int:
    marks = zip(sentences, restarting, looping, strict=True)
    return sum(len(words) for words, restart, loop in marks if not (restart or loop))


#: Default system prompts that chat templates put in front of a conversation that has none, as
#: the model was trained with them: an answer that says them copies its prompt, not the
#: question's answer (SmolLM2's template, Qwen2.5's, and the knowledge-date preamble of Llama
#: 3.1 and later). A server's own template adds to these: :func:`chat_template_texts`.
MODEL_DEFAULT_TEXTS: tuple[str, ...] = (
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face",
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    "Cutting Knowledge Date: December 2023 Today Date:",
)

_TEMPLATE_LITERAL = re.compile(r"'((?:[^'\\]|\\.)*)'|\"((?:[^\"\\]|\\.)*)\"")
_CONTROL_TOKEN = re.compile(r"<\|[^<>|\s]{0,40}\|>|<[a-z_]{1,20}>|\[/?INST\]", re.IGNORECASE)


def chat_template_texts(template: str, min_words: int = PARROT_WORDS) -> tuple[str, ...]:
    """The prose a Jinja chat template writes itself (its string literals, control tokens
    taken out) of at least ``min_words`` words: a default system prompt, mostly. llama-server
    gives its template at ``/props`` (``chat_template``)."""
    found: list[str] = []
    for match in _TEMPLATE_LITERAL.finditer(template):
        literal = match.group(1) if match.group(1) is not None else match.group(2)
        for piece in _CONTROL_TOKEN.split(literal.replace("\\n", "\n")):
            for line in piece.splitlines():
                line = line.strip()
                if word_count(line) >= min_words and line not in found:
                    found.append(line)
    return tuple(found)


@functools.cache
def template_texts() -> tuple[str, ...]:
    """The engine's default instruction, status note, header, update and continue texts (of
    both staircase layouts), and the models' default system prompts
    (:data:`MODEL_DEFAULT_TEXTS`): the prompt text an aggregator may parrot. Read from
    :class:`moa_stream.engine.prompts.PromptTemplates` on first use, so a change to the
    templates changes what is looked for."""
    from moa_stream.engine.prompts import PromptTemplates, whole_layout

    t = PromptTemplates()
    engine = dict.fromkeys((*t.prose(), *whole_layout(t).prose()))  # in order, once each
    return (*engine, *MODEL_DEFAULT_TEXTS)


@functools.cache
def _ngrams(texts: tuple[str, ...], n: int) -> frozenset[tuple[str, ...]]:
    grams: set[tuple[str, ...]] = set()
    for text in texts:
        words = _words(text)
        grams.update(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    return frozenset(grams)


def _parroted(answer: str, texts: tuple[str, ...], n: int = PARROT_WORDS) -> list[str]:
    """Stretches of ``answer`` of ``n`` or more consecutive words that also occur, in that
    order, in one of ``texts``; each as the answer wrote it."""
    grams = _ngrams(texts, n)
    if not grams:
        return []
    spans = [(m.start(), m.end()) for m in _WORD.finditer(answer)]
    words = [w.lower().replace(_APOSTROPHE, "'") for w in _WORD.findall(answer)]
    found: list[str] = []
    i = 0
    while i + n <= len(words):
        if tuple(words[i : i + n]) not in grams:
            i += 1
            continue
        last = i + n - 1
        while last + 1 < len(words) and tuple(words[last + 2 - n : last + 2]) in grams:
            last += 1
        found.append(answer[spans[i][0] : spans[last][1]])
        i = last + 1
    return found


@dataclass(frozen=True, slots=True)
class Integrity:
    """How well an answer holds together.

    ``restarts``: sentences that start the answer over (see :func:`restarts`). ``markup``: the
    pieces of prompt markup or prompt text found in it, as written there, in order. ``words``:
    its length in words. ``length_ratio``: ``words`` over the one-shot answer's words for the
    same question (``None`` when that is not known). ``loops``: sentences that repeat eight
    words of an earlier one (see :func:`loops`). ``fresh_words``: the words of the sentences
    that neither restart nor repeat (see :func:`fresh_words`). ``about_prompt``: phrases with
    which the answer writes about its prompt rather than answering ("the drafts", "the edited
    response", "the message"), as written there, in order.
    """

    restarts: int
    markup: tuple[str, ...]
    words: int
    length_ratio: float | None
    loops: int = 0
    fresh_words: int = 0
    about_prompt: tuple[str, ...] = ()

    @property
    def has_markup(self) -> bool:
        return bool(self.markup)


def answer_integrity(
    answer: str,
    *,
    one_shot_words: int | None = None,
    prompt_texts: Iterable[str] = (),
    question: str = "",
) -> Integrity:
    """Restarts, loops, copied markup, length and length against the one-shot answer of
    ``answer``.

    ``prompt_texts``: more prompt text whose 6-word runs count as parroting, besides the
    engine's default templates (a custom system prompt or instructions, say). The user's own
    question is not prompt text in this sense: an answer may well quote it; ``question``, where
    given, keeps what it speaks of itself ("draft a letter", "send a message") from counting as
    writing about the prompt.
    """
    markup = [m.group(0) for m in _MARKUP.finditer(answer)]
    texts = (*template_texts(), *(t for t in prompt_texts if t))
    markup += _parroted(answer, texts)
    words = word_count(answer)
    ratio = None if not one_shot_words else words / one_shot_words
    sentences = _sentences(answer)
    restarting, looping = _restarting(sentences), _looping(sentences)
    fresh = _fresh(sentences, restarting, looping)
    # A phrase whose noun the question uses ("how the internet sends a message") is the
    # answer's subject, not its prompt.
    asked = {_stem(w) for w in _words(question)}
    about = tuple(
        m.group(0)
        for m in _ABOUT_PROMPT.finditer(answer)
        if _stem(_words(m.group(0))[-1]) not in asked
    )
    return Integrity(sum(restarting), tuple(markup), words, ratio, sum(looping), fresh, about)


# -- smoothness ----------------------------------------------------------------------------------


def _percentile(values: Sequence[float], q: float) -> float | None:
    # Linear interpolation, as moa_stream.bench.report.percentile (kept free of its imports).
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def inter_token_gaps(chunk_times: Sequence[float]) -> list[float]:
    """The gaps between consecutive content chunks: vLLM's inter-token latency (ITL), per
    chunk rather than per token, since a caller sees chunks."""
    return [b - a for a, b in itertools.pairwise(chunk_times)]


@dataclass(frozen=True, slots=True)
class Smoothness:
    """How an answer streamed, as the caller saw it (seconds).

    ``ttft``: start to the first content chunk (``None``: none came). ``total``: start to the
    end of the stream. ``itl_p50``/``itl_p99``: percentiles of the gaps between consecutive
    content chunks (``None`` with fewer than two chunks); ``longest``: the longest such gap
    (0 with fewer than two chunks); ``stalls``: gaps longer than :data:`STALL_S`.
    """

    chunks: int
    ttft: float | None
    total: float
    itl_p50: float | None
    itl_p99: float | None
    longest: float
    stalls: int


def stream_gaps(
    chunk_times: Sequence[float], *, start: float, end: float, stall_s: float = STALL_S
) -> Smoothness:
    """The smoothness of one stream whose content chunks arrived at ``chunk_times`` (in
    order), started at ``start`` and ended at ``end``, all on one clock."""
    gaps = inter_token_gaps(chunk_times)
    return Smoothness(
        chunks=len(chunk_times),
        ttft=chunk_times[0] - start if chunk_times else None,
        total=end - start,
        itl_p50=_percentile(gaps, 50),
        itl_p99=_percentile(gaps, 99),
        longest=max(gaps, default=0.0),
        stalls=sum(1 for g in gaps if g > stall_s),
    )


# -- ended early ---------------------------------------------------------------------------------


def ended_early(
    words: int,
    one_shot_words: int | None,
    *,
    answer_end: float | None,
    reference_ends: Sequence[float | None],
    ratio: float = EARLY_RATIO,
) -> bool | None:
    """Whether an answer ended early: it finished while a reference of the last layer was
    still being written, and it is shorter than ``ratio`` times the one-shot answer.

    ``answer_end``: when the answer's last content chunk arrived; ``reference_ends``: when each
    proposer of the last layer ended (completed, failed or was cancelled; ``None``: it had not
    ended when the run was reported), on the same clock. Both conditions matter: a short
    answer given after every reference was in is the aggregator's choice, and a long one given
    before is not cut short. ``None`` when there is nothing to compare with (no one-shot
    length, or no answer at all).
    """
    if not one_shot_words or answer_end is None:
        return None
    still_writing = any(end is None or end > answer_end for end in reference_ends)
    return still_writing and words < ratio * one_shot_words


# -- cost ----------------------------------------------------------------------------------------

#: What an output token costs, in uncached input tokens, under every price model (list prices
#: of hosted models put output at 3-5x input; 4x is in the middle).
OUTPUT_PRICE = 4.0


@dataclass(frozen=True, slots=True)
class PriceModel:
    """How a provider bills a request, in units of one uncached input token: ``cached`` is the
    price of a prompt token served from the prefix cache, ``uncached`` of one that was not
    (above 1 where writing it into the cache costs extra), ``output`` of a completion token."""

    name: str
    cached: float
    uncached: float = 1.0
    output: float = OUTPUT_PRICE

    def bill(self, prompt_tokens: float, cached_tokens: float, completion_tokens: float) -> float:
        cached = min(cached_tokens, prompt_tokens)
        return (
            self.uncached * (prompt_tokens - cached)
            + self.cached * cached
            + self.output * completion_tokens
        )


#: The three price models the benchmark states its cost under: no prompt caching (every
#: prompt token at full price); cached input at half price (OpenAI's automatic caching); and
#: cached input at a tenth with every uncached prompt token written to the cache at 1.25x
#: (Anthropic's explicit caching, every prompt marked cacheable).
PRICE_MODELS: tuple[PriceModel, ...] = (
    PriceModel("no-cache", cached=1.0),
    PriceModel("cached-0.5x", cached=0.5),
    PriceModel("cached-0.1x-write-1.25x", cached=0.1, uncached=1.25),
)


def bill(
    prompt_tokens: float,
    cached_tokens: float,
    completion_tokens: float,
    model: PriceModel | str = "no-cache",
) -> float:
    """The bill of ``prompt_tokens`` (of which ``cached_tokens`` came from the prefix cache)
    and ``completion_tokens`` under ``model`` (one of :data:`PRICE_MODELS`, or its name), in
    uncached input tokens."""
    if isinstance(model, str):
        model = _PRICE_BY_NAME[model]
    return model.bill(prompt_tokens, cached_tokens, completion_tokens)


def bills(prompt_tokens: float, cached_tokens: float, completion_tokens: float) -> dict[str, float]:
    """The bill under each of :data:`PRICE_MODELS`, by name."""
    return {m.name: m.bill(prompt_tokens, cached_tokens, completion_tokens) for m in PRICE_MODELS}


_PRICE_BY_NAME: Mapping[str, PriceModel] = {m.name: m for m in PRICE_MODELS}
