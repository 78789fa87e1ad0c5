"""Staircase aggregation, the pure part: step schedule, prompts of each step, joins.

A staircase aggregator starts on partial references (when the layer's policy, its *start
rule*, fires), streams one step of at most ``s`` tokens, then is asked again with whatever the
references added meanwhile, and so on until every reference is complete, failed or given up
on; the last step runs to the end of the answer. The caller sees one stream.

Two ways to continue an answer, chosen per provider (:class:`Continuation`):

- ``prefill``: the request ends with the answer so far as a final assistant message, which the
  server continues. Flavours differ only in the request body: ``vllm``
  (``continue_final_message: true, add_generation_prompt: false``), ``prefix`` (DeepSeek and
  Mistral: ``"prefix": true`` on the message), ``llama`` (llama.cpp's llama-server continues a
  trailing assistant message as it is, and, streamed, repeats it at the start of its first
  delta) and ``anthropic`` (native).
- ``turns``: for any chat API. Each step is the previous request plus the previous step's text
  as an assistant turn and a user turn with what the references added.

Prompt layout (:class:`StepPrompts`): every request only *appends* to the previous one, so a
server's prefix cache serves all of it but the new part. The first request is the one-shot
aggregator prompt of :mod:`moa_stream.engine.prompts`; later references text arrives in update
blocks appended after it (``prefill``: to the same user message, then the answer so far;
``turns``: in new turns). References never grow in the middle of a prompt.

Nothing here does I/O; :mod:`moa_stream.engine.run` drives it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from moa_stream._exceptions import ConfigError
from moa_stream._types import ChatMessage
from moa_stream.engine.events import ReferenceInfo, ReferenceStatus
from moa_stream.engine.layer import Reference
from moa_stream.engine.layer import last_sentence_end as _last_sentence_end
from moa_stream.engine.prompts import (
    PromptTemplates,
    append_to_last_user,
    render_draft,
    render_references,
    render_update,
    with_system_prompt,
)

__all__ = [
    "CHARS_PER_TOKEN",
    "CONTINUATION_METHODS",
    "LAYOUTS",
    "PREFILL_FLAVOURS",
    "Continuation",
    "ContinuationGuard",
    "RefView",
    "Joiner",
    "MarkupFilter",
    "ReferenceTracker",
    "RepetitionGate",
    "Staircase",
    "StepPrompts",
    "cut_point",
    "estimated_tokens",
    "parse_steps",
    "sentence_openings",
    "stable_length",
    "step_sizes",
]

ContinuationMethod = Literal["prefill", "turns"]
StepLayout = Literal["updates", "whole"]
PrefillFlavour = Literal["vllm", "llama", "prefix", "anthropic"]

CONTINUATION_METHODS: tuple[ContinuationMethod, ...] = ("prefill", "turns")
LAYOUTS: tuple[StepLayout, ...] = ("updates", "whole")
PREFILL_FLAVOURS: tuple[PrefillFlavour, ...] = ("vllm", "llama", "prefix", "anthropic")


@dataclass(frozen=True, slots=True)
class Continuation:
    """How an aggregator's answer is continued on its provider (see the module docstring)."""

    method: ContinuationMethod = "turns"
    flavour: PrefillFlavour = "vllm"

    def __post_init__(self) -> None:
        if self.method not in CONTINUATION_METHODS:
            raise ConfigError(f"unknown continuation method {self.method!r}")
        if self.flavour not in PREFILL_FLAVOURS:
            raise ConfigError(f"unknown prefill flavour {self.flavour!r}")

    def __str__(self) -> str:
        return f"prefill:{self.flavour}" if self.method == "prefill" else "turns"

    @property
    def echoes(self) -> bool:
        """Whether the server repeats the prefill at the start of its stream."""
        return self.method == "prefill" and self.flavour == "llama"

    def prefill_extra(self) -> dict[str, Any]:
        """Request-body fields a prefill request needs (merged into ``ChatRequest.extra``)."""
        if self.method == "prefill" and self.flavour == "vllm":
            return {"continue_final_message": True, "add_generation_prompt": False}
        return {}

    def prefill_message(self, text: str) -> ChatMessage:
        """The final assistant message holding the answer so far."""
        message: ChatMessage = {"role": "assistant", "content": text}
        if self.flavour == "prefix":
            message["prefix"] = True
        return message


def parse_continuation(text: str) -> Continuation:
    """``"turns"``, ``"prefill"`` (vLLM flavour) or ``"prefill:<flavour>"``."""
    method, _, flavour = text.partition(":")
    if method == "turns" and not flavour:
        return Continuation("turns")
    if method == "prefill":
        if flavour and flavour not in PREFILL_FLAVOURS:
            raise ValueError(
                f"unknown prefill flavour {flavour!r} (known: {', '.join(PREFILL_FLAVOURS)})"
            )
        return Continuation("prefill", flavour or "vllm")
    raise ValueError(
        f"unknown continuation {text!r} (known: turns, prefill, "
        + ", ".join(f"prefill:{f}" for f in PREFILL_FLAVOURS)
        + ")"
    )


def parse_steps(text: str | Sequence[int]) -> tuple[int, ...]:
    """A step schedule: ``"8, 16, 32, 64"`` or a list of token counts, each >= 1. After the
    last one the last size repeats."""
    if isinstance(text, str):
        try:
            steps = tuple(int(part) for part in text.replace(",", " ").split())
        except ValueError:
            raise ValueError(f"steps must be whole numbers, got {text!r}") from None
    else:
        steps = tuple(text)
    if not steps:
        raise ValueError("a step schedule needs at least one step")
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in steps):
        raise ValueError("every step must be a whole number >= 1")
    return steps


def step_sizes(steps: Sequence[int]) -> Iterator[int]:
    """The schedule's sizes in order, the last one repeated for ever."""
    yield from steps
    while True:
        yield steps[-1]


@dataclass(frozen=True, slots=True)
class Staircase:
    """Turns the final aggregator into a staircase (``MoA.staircase``).

    The last layer's policy is the *start rule* (``partial(2, min_tokens=8)``,
    ``deadline(0.5, partial=true)`` ...); its proposers keep running after it fires, and each
    step sees what they wrote since.

    ``steps``: the step schedule in aggregator tokens (the last size repeats): a step boundary
    comes after that many tokens, at the next word that starts inside a sentence (a model asked
    to continue a sentence continues it; one asked to continue after a full stop tends to start
    over).

    At a boundary the stream *pauses* while the next step is asked and its first
    ``guard_words`` words are held and checked (:class:`ContinuationGuard`). A step that
    restarts the answer, copies prompt markup or instruction text, ends at once or is not ready
    within ``max_pause`` seconds is *rejected*: it is closed and the previous step's stream,
    which was only paused, goes on. ``lead``: the answer runs at most this many tokens ahead of
    a reference still being written before it slows to half that reference's pace (``None``:
    never); no wait, for a step or a reference, lasts beyond ``max_pause`` after the caller's
    last chunk. So an answer is never
    worse-formed than its previous step would have written it.

    Stepping stops (the current step runs to the end of the answer) once every reference is
    complete, failed or given up on; after ``max_steps`` later steps; after ``max_rejects``
    rejected steps in a row; and when the next request would not fit ``context_window`` (tokens,
    estimated at :data:`CHARS_PER_TOKEN` characters each, with room for the rest of the answer;
    ``None``: unknown, a context-length error from the server then ends the stepping instead).
    A boundary asks a new step only when the references gained at least ``min_news``
    characters since the last one, or one of them completed or failed.

    ``give_up_after``: seconds after the start rule fired at which references still running are
    given up on (and, if the layer's stragglers are ``cancel``, cancelled); ``None``: never.
    ``continuation``: how answers are continued, per aggregator name, with ``default`` for the
    others. An aggregator whose server refuses prefill (HTTP 400, as Anthropic's newer models
    answer) is moved to appended turns for the life of its provider, once, with a warning.

    An answer that loops (:class:`RepetitionGate`: ``loop_restarts`` sentences in a row that
    each open like an earlier one or repeat eight words in a row of one; ``None`` or 0: never)
    ends there, and the aggregator's next runs start once every reference has ended, with a
    back-off after which the early start is tried again. A restart now and then, as models
    write in one-shot answers too, goes on.

    ``read_ahead``: chunks of the current step read ahead of what the caller has been given
    (``0``: none). The next step continues after them and is tried while the caller is given
    them, spaced out to last until its first words, so a later step's time to first token does
    not stop the stream.

    ``layout``: ``"updates"`` hands each step what the references added, in tagged blocks
    appended to the previous request (a prefix cache serves all but the new tail);
    ``"whole"`` re-renders every draft in place, whole sentences only and without status
    labels (:func:`~moa_stream.engine.prompts.whole_layout`), and its first step waits at most
    ``max_pause`` for each running draft's first sentence.
    """

    steps: tuple[int, ...] = (8, 16, 32, 64, 128)
    lead: int | None = 32
    give_up_after: float | None = None
    default: Continuation = field(default_factory=Continuation)
    continuation: Mapping[str, Continuation] = field(default_factory=dict)
    max_steps: int | None = 4
    max_rejects: int = 2
    max_pause: float = 1.0
    guard_words: int = 4
    min_news: int = 80
    context_window: int | None = None
    layout: StepLayout = "updates"
    loop_restarts: int | None = 2
    read_ahead: int = 32

    def __post_init__(self) -> None:
        # An invalid argument is a ConfigError, as everywhere else in the engine; the text
        # parsers keep raising ValueError, which the config loader turns into a located error.
        try:
            parse_steps(self.steps)
        except ValueError as exc:
            raise ConfigError(f"Staircase(steps): {exc}") from None
        if self.lead is not None and self.lead < 0:
            raise ConfigError("Staircase(lead) needs lead >= 0")
        if self.give_up_after is not None and not self.give_up_after >= 0:
            raise ConfigError("Staircase(give_up_after) needs a non-negative number")
        for name in (
            "max_steps",
            "max_rejects",
            "guard_words",
            "min_news",
            "context_window",
            "loop_restarts",
            "read_ahead",
        ):
            value = getattr(self, name)
            if value is None and name in ("max_steps", "context_window", "loop_restarts"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"Staircase({name}) needs a whole number >= 0")
        if self.guard_words < 1:
            raise ConfigError("Staircase(guard_words) needs at least 1 word")
        if not self.max_pause > 0:
            raise ConfigError("Staircase(max_pause) needs a positive number of seconds")
        if self.layout not in LAYOUTS:
            raise ConfigError(f"Staircase(layout) must be one of {', '.join(LAYOUTS)}")

    def for_agent(self, name: str) -> Continuation:
        return self.continuation.get(name, self.default)


#: Characters per token when a prompt's size is estimated against a context window: low for
#: English (about 4), so the estimate errs towards "does not fit".
CHARS_PER_TOKEN = 3.0


def estimated_tokens(messages: Sequence[ChatMessage]) -> int:
    """A cautious token count of ``messages`` (text plus a few tokens of template each)."""
    chars = 0
    for message in messages:
        content = message.get("content")
        chars += len(content) if isinstance(content, str) else 0
    return int(chars / CHARS_PER_TOKEN) + 8 * len(messages)


# -- what a reference may hand over ----------------------------------------------------------

_SHORT_TAIL = 24


def stable_length(text: str, complete: bool) -> int:
    """How much of a reference's ``text`` a step hands over: all of it once complete; while
    it is still being written, up to its last sentence end or line break (so an unfinished
    short line such as ``"Answer: "`` waits for its end), else up to its last whitespace. A
    reference is never handed over mid-word, and what is handed over never changes."""
    if complete:
        return len(text)
    cut = _last_sentence_end(text)
    tail_start = max(cut, text.rfind("\n") + 1)
    space = max(text.rfind(" "), text.rfind("\t"))
    if space + 1 > tail_start and len(text) - tail_start >= _SHORT_TAIL:
        cut = space + 1
    return cut


# -- where a step may end, and whether the next one may take over ---------------------------

_WORD = re.compile(r"[^\W_]+(?:['\u2019][^\W_]+)*")
_SENTENCE_SPLIT = re.compile(r"[.!?]+(?=\s|$)|\n+")


def cut_point(answer: str, next_text: str, *, min_words: int = 3) -> bool:
    """Whether a step may end between ``answer`` and ``next_text`` (the next delta, not yet
    passed on): at a word boundary (``next_text`` starts a new word, whether the space that
    separates them ends ``answer`` or starts ``next_text``), inside a sentence that already
    has ``min_words`` words. Ending mid-sentence is what lets a model continue rather than
    start over; ending after a whole word keeps tokenizers on a word boundary."""
    if not next_text or next_text[0] == "\n":
        return False
    stripped = answer.rstrip(" \t")
    if len(stripped) == len(answer):
        if not next_text[0].isspace():
            return False
    elif next_text[0].isspace() or "\n" in answer[len(stripped) :]:
        return False
    last = stripped[-1:]
    if not (last.isalnum() or last == ","):
        return False
    tail = stripped[-200:]
    start = 0
    for match in _SENTENCE_SPLIT.finditer(tail):
        start = match.end()
    return len(_WORD.findall(tail[start:])) >= min_words


def _opening(sentence: str, n: int) -> tuple[str, ...] | None:
    words = _WORD.findall(sentence.lower())
    return tuple(words[:n]) if len(words) >= n else None


def sentence_starts(text: str, n: int = 4) -> set[tuple[str, ...]]:
    """The first ``n`` words (lower-cased) of every sentence of ``text``, and all the words of
    a sentence that has fewer."""
    out = set()
    for part in _SENTENCE_SPLIT.split(text):
        words = _WORD.findall(part.lower())
        if words:
            out.add(tuple(words[:n]))
    return out


def sentence_openings(text: str, n: int = 4) -> set[tuple[str, ...]]:
    """The first ``n`` words (lower-cased) of every sentence of ``text`` that has ``n``."""
    return {start for start in sentence_starts(text, n) if len(start) == n}


_MARKUP = re.compile(
    r"<\s*/?\s*draft\b|\bdraft\s+n\s*=|status\s*=\s*\"|<\|[a-z_]*\|?>?|\[/?(?:INST|answer)\b",
    re.IGNORECASE,
)


def _shingles(text: str, n: int) -> set[tuple[str, ...]]:
    words = _WORD.findall(text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


class ContinuationGuard:
    """Judges the first words of a later step before any of them reaches the caller.

    Rejects a step whose first words restart the answer (a sentence whose first four words open
    a sentence already written, or the held text itself beginning like one), copy prompt markup
    (draft tags, chat-template tokens) or instruction text (five words in a row of the prompt's
    own instructions), begin a new line in the middle of a sentence or a capitalised word glued
    onto the answer's last word, or end before
    ``words`` words unless they end a sentence. Accepts once ``words`` whole words passed.
    """

    __slots__ = ("_answer", "_held", "_instructions", "_openings", "_words", "reason")

    def __init__(self, answer: str, instructions: Sequence[str], *, words: int = 4) -> None:
        self._answer = answer
        self._words = words
        self._held = ""
        self._openings = sentence_openings(answer)
        shingles: set[tuple[str, ...]] = set()
        for text in instructions:
            shingles |= _shingles(text, 5)
        self._instructions = shingles
        self.reason: str | None = None

    @property
    def held(self) -> str:
        return self._held

    def feed(self, text: str) -> bool | None:
        """Take the step's next text: ``True`` accepted, ``False`` rejected (see ``reason``),
        ``None`` not decided yet."""
        self._held += text
        held = self._held
        problem = self._problem(held)
        if problem:
            self.reason = problem
            return False
        words = _WORD.findall(held)
        # A word is whole once something follows it.
        whole = len(words) - (1 if held[-1:].isalnum() else 0)
        if whole < self._words:
            return None
        # A sentence begun inside the held text is judged on its own first four words.
        ends = [m.end() for m in _SENTENCE_SPLIT.finditer(held)]
        if ends and ends[-1] < len(held):
            started = _WORD.findall(held[ends[-1] :])
            if len(started) - (1 if held[-1:].isalnum() else 0) < 4:
                return None
        return True

    def finish(self) -> bool:
        """The step ended before a decision: accepted only if what it wrote ends a sentence."""
        problem = self._problem(self._held)
        if problem:
            self.reason = problem
            return False
        if self._held.rstrip()[-1:] in (".", "!", "?") and self._answer.strip():
            return True
        self.reason = "ended early"
        return False

    def _problem(self, held: str) -> str | None:
        if _MARKUP.search(held):
            return "markup"
        stripped = held.lstrip(" \t")
        answer = self._answer
        if stripped.startswith("\n") and answer[-1:].isalnum():
            return "new line mid-sentence"
        if self._instructions and self._instructions & _shingles(held, 5):
            return "instruction text"
        openings = self._openings
        if openings:
            own = _opening(held, 4)
            if own is not None and own in openings:
                return "restart"
            # Sentences that begin inside the held text.
            text = answer + held
            start = len(answer)
            for match in _SENTENCE_SPLIT.finditer(text, max(0, len(answer) - 200)):
                if match.end() < start:
                    continue
                opening = _opening(text[match.end() :], 4)
                if opening is not None and opening in openings:
                    return "restart"
        if (answer[-1:].isalnum() or answer[-1:] == ",") and held[:1].isupper():
            # "Eat a balanced" + "You're an AI assistant", "manner," + "Situational
            # interpretation:": a new reply glued onto the last word or comma (steps end after
            # a whole word, so a continuation starts with a space or punctuation).
            return "new sentence mid-sentence"
        return None


#: A sentence boundary for :class:`RepetitionGate`: end punctuation then whitespace, or line
#: breaks.
_GATE_END = re.compile(r"[.!?]+\s+|\n+")


def _loops_within(sentence: str, n: int) -> bool:
    """Whether ``sentence`` repeats ``n`` words in a row within itself."""
    words = _WORD.findall(sentence.lower())
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) < len(grams)


def _sentence_before(text: str) -> int:
    """Where the last sentence of ``text``, which ends at a sentence boundary, starts."""
    body = text.rstrip()
    start = max(0, len(body) - 2000)
    for match in _GATE_END.finditer(body, start):
        start = match.end()
    return start


#: The sentence under way is checked for a loop within itself (see :class:`RepetitionGate`)
#: each time the answer grew by this many characters: one that never ends ("the sky that is a
#: result of the sky that is a result of the sky ...", SmolLM2-135M by appended turns, to its
#: token limit) shows no sentence end to judge it at.
LONG_SENTENCE = 160

#: How many opening words of a sentence of the prompt's own text identify a copy of it in an
#: answer (see :class:`RepetitionGate`): the templates' sentences open in ways an answer does
#: not ("A note marked", "The notes went", "Continue your answer").
PROMPT_WORDS = 3


class RepetitionGate:
    """Ends an answer that loops: ``limit`` sentences in a row that each restart or repeat an
    earlier one (SmolLM2-135M, continuing by prefill, wrote "The sky is blue, a fundamental" on
    thirty-three lines in a row).

    A sentence whose first ``words`` words open like an earlier sentence's (see
    :func:`sentence_openings`) is a *restart*; one that repeats ``loop_words`` words in a row of
    an earlier sentence is a *repeat* (a list whose items open differently and go on alike:
    "The fifth tip is to stay away from the temptation of a glass of water ... The sixth tip is
    to stay away from ..."). The first words of a sentence are held until they can be compared
    with the openings before. When the sentence that makes ``limit`` in a row restarts, it is
    dropped and :attr:`looping` set: the answer ends at the sentence end before it; when it only
    repeats, which shows at its end, the answer ends after it (holding every sentence whole
    until its end would stall the stream for a sentence at a time). A sentence that repeats
    ``loop_words`` words in a row within itself loops too: the sentence under way is checked
    every :data:`LONG_SENTENCE` characters of the answer, and the answer ends there.

    Only runs count. A model restarts now and then in any answer (SmolLM2-135M, in
    ``benchmarks/real_inference.py``: 2.0 restarts and 1.2 repeats an answer as wait-all's
    aggregator, 0.4 and 0.2 alone), and ending an answer at its second restart anywhere ended
    answers that wait-all's aggregator went on with; a loop restarts sentence after sentence.

    A sentence that opens like a sentence of the prompt's own text (``prompt``: the
    instructions, headers and continue request; "The notes went on. What they added since,
    quoted the same way:") is the prompt copied into the answer: it is dropped, up to its end,
    and counted in :attr:`parroted`; the answer goes on. Its first :data:`PROMPT_WORDS` words
    are enough, as a small model paraphrases what it copies ("A note marked incomplete: it may
    have finished but not produced its final output." for the status note's "A note marked
    partial is unfinished: ...").

    Text passes through untouched, at the cost of one short regular-expression search, except
    at the start of a sentence whose first words open like an earlier sentence or a sentence of
    the prompt: those are held until they differ, or make four words (a few tokens held)."""

    __slots__ = (
        "_flagged",
        "_grams",
        "_held",
        "_holding",
        "_known",
        "_prompt_heads",
        "_prompt_prefixes",
        "_run",
        "_swallow",
        "_unended",
        "limit",
        "loop_words",
        "looping",
        "parroted",
        "repeats",
        "restarts",
        "words",
    )

    def __init__(
        self, *, words: int = 4, limit: int = 2, loop_words: int = 8, prompt: Sequence[str] = ()
    ) -> None:
        self.words = words
        self.limit = limit
        self.loop_words = loop_words
        self.restarts = 0
        self.repeats = 0
        self.parroted = 0
        self.looping = False
        # The first sentence's opening is held too, to be compared with the prompt's.
        self._held = ""
        self._holding = True
        # Sentences in a row that restarted or repeated; whether the one under way restarted.
        self._run = 0
        self._flagged = False
        # Inside a sentence of the prompt's, dropped up to its end: the last character dropped.
        self._swallow: str | None = None
        self._unended = 0  # characters passed since the last check for a loop within a sentence
        openings: set[tuple[str, ...]] = set()
        for text in prompt:
            openings |= sentence_openings(text, words)
        self._prompt_heads = {o[:PROMPT_WORDS] for o in openings}
        self._prompt_prefixes = {o[:k] for o in openings for k in range(1, words + 1)}
        self._known: tuple[int, set[tuple[str, ...]], set[tuple[str, ...]]] = (-1, set(), set())
        # The 8-word runs of the answer's sentences up to a sentence end (how much text).
        self._grams: tuple[int, set[tuple[str, ...]]] = (0, set())

    @property
    def held(self) -> str:
        return self._held

    def _ended(self, sentence: int, text: str) -> None:
        """The sentence of ``text`` that starts at ``sentence`` ended and was passed on: the
        run of sentences that restarted or repeated goes on (and may make a loop: the answer
        ends after this sentence) or starts again."""
        repeated = bool(self.loop_words) and self._repeats(sentence, text)
        if repeated:
            self.repeats += 1
        self._run = self._run + 1 if repeated or self._flagged else 0
        self._flagged = False
        if self._run >= self.limit:
            self.looping = True

    def _starts(self, answer: Callable[[], str]) -> tuple[set[tuple[str, ...]], ...]:
        """The starts of the answer's sentences (:func:`sentence_starts`) and every prefix of
        them, computed again only when the answer grew."""
        text = answer()
        if self._known[0] != len(text):
            starts = sentence_starts(text, self.words)
            prefixes = {s[:k] for s in starts for k in range(1, len(s) + 1)}
            self._known = (len(text), starts, prefixes)
        return self._known[1:]

    def feed(self, text: str, before: str, answer: Callable[[], str]) -> str:
        """The part of ``text`` to pass on now. ``before``: the answer's last character;
        ``answer``: the answer the caller has (called only when a sentence's opening is judged,
        and every :data:`LONG_SENTENCE` characters)."""
        if not self.limit:
            return text  # off
        if self.looping:
            return ""
        return self._within(self._feed(text, before, answer), answer)

    def _feed(self, text: str, before: str, answer: Callable[[], str]) -> str:
        if self._swallow is not None:
            # Inside a sentence of the prompt's: dropped up to its end (which may begin in the
            # last character dropped, a full stop before this text's space).
            tail = self._swallow + text
            stop = _GATE_END.search(tail)
            if stop is None:
                self._swallow = tail[-1:]
                return ""
            self._swallow = None
            self._held, self._holding = "", True
            text = tail[stop.end() :]
        if self._holding:
            self._held += text
            return self._judge(answer, final=False)
        match = _GATE_END.search(before + text)
        if match is None:
            return text
        # The sentence under way ends here; the text after it is judged sentence by sentence.
        end = max(0, match.end() - len(before))
        out = text[:end]
        self._held = text[end:]
        self._holding = True
        ended = answer() + out
        self._ended(_sentence_before(ended), ended)
        if self.looping:
            self.drop()
            return out
        return out + self._judge(lambda: answer() + out, final=False)

    def _within(self, out: str, answer: Callable[[], str]) -> str:
        """``out``, passed on; every :data:`LONG_SENTENCE` characters passed, the sentence under
        way is checked for a loop within itself (one that never ends has no end to be judged
        at): the answer ends with ``out``."""
        self._unended += len(out)
        if self._unended >= LONG_SENTENCE and self.loop_words and not self.looping:
            self._unended = 0
            whole = answer() + out
            if _loops_within(whole[_sentence_before(whole) :], self.loop_words):
                self.repeats += 1
                self.looping = True
                self.drop()
        return out

    def _repeats(self, sentence: int, text: str) -> bool:
        """Whether the sentence of ``text`` that starts at ``sentence`` repeats ``loop_words``
        words in a row of the sentences before it (the text up to ``sentence``)."""
        n = self.loop_words
        known, grams = self._grams
        if sentence < known:  # the answer was replaced: count from the start again
            known, grams = 0, set()
        for part in _GATE_END.split(text[known:sentence]):
            grams |= _shingles(part, n)
        self._grams = (sentence, grams)
        return not grams.isdisjoint(_shingles(text[sentence:], n))

    def flush(self, answer: Callable[[], str]) -> str:
        """The stream ended: what is still held, judged on the words it has."""
        if not self._holding or self.looping:
            return ""
        return self._judge(answer, final=True)

    def drop(self) -> None:
        """Another stream takes over: what this one held is not the answer."""
        self._held = ""
        self._holding = False
        self._swallow = None
        self._flagged = False

    def _judge(self, answer: Callable[[], str], *, final: bool) -> str:
        held = self._held
        lead = len(held) - len(held.lstrip())
        body = held[lead:]
        match = _GATE_END.search(body)
        sentence = body if match is None else body[: match.start()]
        words = _WORD.findall(sentence)
        if match is None and not final and not self._flagged:
            whole = len(words) - (1 if body[-1:].isalnum() else 0)
            if whole < self.words:
                # Held only while its whole words so far open like an earlier sentence: one
                # that already differs cannot be a restart, and goes on at once.
                prefix = tuple(w.lower() for w in words[:whole])
                if (
                    not prefix
                    or prefix in self._prompt_prefixes
                    or prefix in self._starts(answer)[1]
                ):
                    return ""
                words = []  # not a restart
        # A sentence restarts when its first words open an earlier sentence; a short one ("A" on
        # a line of its own, thirty lines in a row) when an earlier sentence was those words.
        restarted = False
        judged = len(words) >= self.words or (bool(words) and (match is not None or final))
        if judged and not self._flagged:
            opening = tuple(w.lower() for w in words[: self.words])
            if opening[:PROMPT_WORDS] in self._prompt_heads:
                self.parroted += 1
                if match is None:
                    self._held, self._holding = "", False
                    self._swallow = None if final else held[-1:]
                    return ""
                self._held = held[lead + match.end() :]
                return self._judge(answer, final=final)
            restarted = opening in self._starts(answer)[0]
        if restarted:
            self.restarts += 1
            if self._run + 1 >= self.limit:
                self.looping = True
                self.drop()
                return ""
            self._flagged = True
        self._holding = False
        self._held = ""
        if match is None and not final:
            return held  # its opening passed; the rest of it goes on as it comes
        before = answer() + held[:lead]
        self._ended(len(before), before + sentence)
        if match is None:
            return held
        cut = lead + match.end()
        out = held[:cut]
        if self.looping:
            return out
        # The held text ends that sentence and begins another: hold the new one's opening.
        self._held = held[cut:]
        self._holding = True
        return out + self._judge(lambda: answer() + out, final=final)


_TAG = re.compile(r"<\s*/?\s*draft\b[^>\n]{0,160}>|<\|[^|>\n]{0,40}\|>", re.IGNORECASE)
_TAG_START = re.compile(
    r"<(?:\s*/?\s*(?:d(?:r(?:a(?:f(?:t(?:\b[^>\n]{0,160})?)?)?)?)?)?|\|[^|>\n]{0,40}\|?)\Z",
    re.IGNORECASE,
)


class MarkupFilter:
    """Drops prompt markup a model copies into its answer: the references' quoting tags
    (``<draft ...>``, ``</draft>``) and chat-template tokens (``<|im_end|>``), with the line
    breaks that set them apart. Text without ``<`` passes through untouched (one ``in`` test
    per delta); from a ``<`` on, text is held until it is known to be a tag or not."""

    __slots__ = ("_held", "_line_start", "dropped")

    def __init__(self) -> None:
        self._held = ""
        self._line_start = True
        self.dropped = 0  # tags dropped

    def feed(self, text: str) -> str:
        if not self._held and "<" not in text:
            if text:
                self._line_start = text[-1] == "\n"
            return text
        text = self._held + text
        self._held = ""
        out: list[str] = []
        while text:
            i = text.find("<")
            if i < 0:
                out.append(text)
                break
            if i:
                out.append(text[:i])
                self._line_start = text[i - 1] == "\n"
            rest = text[i:]
            tag = _TAG.match(rest)
            if tag is not None:
                self.dropped += 1
                text = rest[tag.end() :]
                if self._line_start or not out:
                    text = text.lstrip("\n")
                continue
            if _TAG_START.match(rest):
                self._held = rest
                break
            out.append("<")
            self._line_start = False
            text = rest[1:]
        return "".join(out)

    def flush(self) -> str:
        """What is held at the end: an unfinished ``<...`` that never became a tag."""
        held, self._held = self._held, ""
        return held


# -- references across steps -----------------------------------------------------------------

#: One reference as a step sees it: its proposer's index and name, its state (``running``,
#: ``complete``, ``failed`` or ``cancelled``) and its text so far.
RefView = tuple[int, str, str, str]

_GIVEN_STATUS = {"running": "partial", "complete": "complete", "failed": "failed"}
_INFO_STATUS: dict[str, ReferenceStatus] = {
    "partial": "partial",
    "complete": "complete",
    "failed": "failed",
    "cancelled": "partial",  # given up on: what was quoted of it is partial text
}


@dataclass(slots=True)
class _Given:
    number: int
    chars: int
    status: str


class ReferenceTracker:
    """What each step has handed the aggregator of every reference: numbers in order of first
    appearance, characters given, status given."""

    def __init__(
        self,
        templates: PromptTemplates,
        max_reference_chars: int | None,
        *,
        whole_sentences: bool = False,
    ) -> None:
        self._t = templates
        self._cap = max_reference_chars
        self._whole = whole_sentences
        self._given: dict[int, _Given] = {}

    def _stable(self, text: str, complete: bool) -> int:
        """How much of ``text`` may be handed over: :func:`stable_length`, or with
        ``whole_sentences`` only up to the last sentence end of a reference still running."""
        if complete or not self._whole:
            return stable_length(text, complete)
        return _last_sentence_end(text)

    def _handed(self, text: str, status: str) -> int:
        """How much of a reference with ``status`` may be handed over now: nothing of one that
        failed (as a layer hands it over: its label says it gave no answer), the stable part,
        capped, of the others."""
        if status == "failed":
            return 0
        n = self._stable(text, status == "complete")
        return n if self._cap is None else min(n, self._cap)

    @staticmethod
    def _status(state: str, given_up: bool) -> str | None:
        if state == "cancelled" or (given_up and state == "running"):
            return "cancelled"
        return _GIVEN_STATUS.get(state)

    def first(self, refs: Sequence[RefView]) -> str:
        """The reference block of the first step (every reference with text, or failed)."""
        quoted: list[Reference] = []
        numbers: list[int] = []
        for index, _, state, text in refs:
            status = self._status(state, False)
            if status is None or status == "cancelled":
                continue
            n = self._handed(text, status)
            if n == 0 and status == "partial":
                continue
            number = len(self._given) + 1
            self._given[index] = _Given(number, n, status)
            quoted.append(Reference(str(index), index, status, text[:n]))  # type: ignore[arg-type]
            numbers.append(number)
        return render_references(quoted, self._t, numbers=numbers)

    def _views(
        self, refs: Sequence[RefView], given_up: bool
    ) -> Iterator[tuple[int, str, str, int, _Given | None]]:
        """Each reference with a status to hand over: its index, that status, its text, how
        much of it may be handed over now, and what was given of it so far."""
        for index, _, state, text in refs:
            status = self._status(state, given_up)
            if status is not None:
                n = self._handed(text, status)
                yield index, status, text, n, self._given.get(index)

    def gains(self, refs: Sequence[RefView], *, given_up: bool = False) -> list[str]:
        """The rendered additions since the last step (empty: nothing new), and records them
        as given. ``given_up``: references still running are reported as given up on."""
        parts: list[str] = []
        for index, status, text, n, given in self._views(refs, given_up):
            if given is None:
                if status == "cancelled" or (n == 0 and status == "partial"):
                    continue
                number = len(self._given) + 1
                self._given[index] = _Given(number, n, status)
                parts.append(render_draft(number, status, text[:n], self._t))
                continue
            if status in ("failed", "cancelled"):
                n = given.chars  # nothing more of it is used
            if n > given.chars or status != given.status:
                new = text[given.chars : n] if n > given.chars else ""
                parts.append(render_draft(given.number, status, new, self._t, continued=True))
                given.chars = max(n, given.chars)
                given.status = status
        return parts

    def block(self, refs: Sequence[RefView], *, given_up: bool = False) -> str:
        """The whole reference block as the references stand now (the ``whole`` layout): every
        reference quoted so far, or with text to quote now, in the order of first appearance,
        each with all of its text handed over; records it as given. A reference that failed or
        was given up on keeps what was quoted of it; one that failed before any is left out."""
        texts = {index: text for index, _, _, text in refs}
        for index, status, _, n, given in self._views(refs, given_up):
            if given is None:
                if status in ("failed", "cancelled") or n == 0:
                    continue
                self._given[index] = _Given(len(self._given) + 1, n, status)
                continue
            if status in ("partial", "complete"):
                given.chars = max(n, given.chars)
            given.status = status
        quoted = sorted(self._given.items(), key=lambda item: item[1].number)
        references = [
            Reference(str(index), index, g.status, texts.get(index, "")[: g.chars].rstrip())  # type: ignore[arg-type]
            for index, g in quoted
        ]
        if not references:
            return ""  # nothing to quote yet: the request is the conversation alone
        return render_references(references, self._t, numbers=[g.number for _, g in quoted])

    def has_quote(self, refs: Sequence[RefView]) -> bool:
        """Whether :meth:`first` would quote text of a reference now."""
        for _, _, state, text in refs:
            status = self._status(state, False)
            if status in ("partial", "complete") and self._handed(text, status):
                return True
        return False

    @staticmethod
    def first_sentence_pending(refs: Sequence[RefView]) -> bool:
        """Whether a reference being written has text but no sentence end yet."""
        return any(
            state == "running" and text.strip() and not _last_sentence_end(text)
            for _, _, state, text in refs
        )

    def settled(self, refs: Sequence[RefView]) -> bool:
        """Whether the last step saw every reference in its final state."""
        for index, _, state, _ in refs:
            given = self._given.get(index)
            if state == "running":
                return False
            if state == "complete" and (given is None or given.status != "complete"):
                return False
            if state == "failed" and given is not None and given.status != "failed":
                return False
        return True

    def snapshot(self) -> dict[int, tuple[int, int, str]]:
        """What has been given so far, to :meth:`restore` if the step that took it is rejected."""
        return {i: (g.number, g.chars, g.status) for i, g in self._given.items()}

    def restore(self, snapshot: dict[int, tuple[int, int, str]]) -> None:
        self._given = {i: _Given(*v) for i, v in snapshot.items()}

    def news(self, refs: Sequence[RefView], *, given_up: bool = False) -> tuple[int, bool]:
        """What :meth:`gains` would report: characters of new text, and whether a reference
        changed state (completed, failed, given up on, or appeared). Records nothing."""
        chars = 0
        changed = False
        for _, status, _, n, given in self._views(refs, given_up):
            if given is None:
                # A reference quoted for the first time: new text, or a new state to report.
                if status != "cancelled" and (status != "partial" or n):
                    chars += n
                    changed = True
                continue
            changed = changed or status != given.status
            if status in ("partial", "complete"):
                chars += max(0, n - given.chars)
        return chars, changed

    def has_news(self, refs: Sequence[RefView], *, given_up: bool = False) -> bool:
        """Whether :meth:`gains` would report anything (it records nothing)."""
        chars, changed = self.news(refs, given_up=given_up)
        return chars > 0 or changed

    def infos(self, refs: Sequence[RefView]) -> tuple[ReferenceInfo, ...]:
        """What the last step holds of every reference (``chars`` 0: nothing of it yet), for
        :class:`AggregatorStep`."""
        out = []
        for index, agent, state, _ in refs:
            given = self._given.get(index)
            if given is None:  # not quoted yet: no text so far, or failed before any
                status = _INFO_STATUS.get(_GIVEN_STATUS.get(state, "cancelled"), "partial")
                out.append(ReferenceInfo(agent, index, status, 0, 0))
                continue
            status = _INFO_STATUS.get(given.status, "partial")
            out.append(ReferenceInfo(agent, index, status, given.chars, (given.chars + 3) // 4))
        return tuple(out)


# -- the requests of each step ---------------------------------------------------------------


class StepPrompts:
    """The messages (and extra body fields) of each step of one aggregator.

    Every request extends the previous one: only its tail is new (see the module docstring).
    """

    def __init__(
        self,
        conversation: Sequence[ChatMessage],
        continuation: Continuation,
        templates: PromptTemplates,
        system_prompt: str | None = None,
    ) -> None:
        self.continuation = continuation
        self._t = templates
        self._base = with_system_prompt(conversation, system_prompt)
        self._messages: list[ChatMessage] = []
        self._pending: list[ChatMessage] | None = None
        self.steps = 0

    def first(self, reference_block: str) -> list[ChatMessage]:
        """The first step: the one-shot aggregator prompt."""
        self._messages = self._with_block(reference_block)
        self.steps = 1
        return list(self._messages)

    def _with_block(self, block: str) -> list[ChatMessage]:
        messages = list(self._base)
        return append_to_last_user(messages, block) if block else messages

    def next(
        self, update_parts: Sequence[str], step_text: str, answer: str
    ) -> tuple[list[ChatMessage], dict[str, Any]]:
        """The next step, after the previous step wrote ``step_text`` (the answer so far is
        ``answer``); ``update_parts`` come from :meth:`ReferenceTracker.gains`. Taken at once:
        :meth:`propose` and :meth:`commit` in one."""
        messages, extra = self.propose(update_parts, step_text, answer)
        self.commit()
        return messages, extra

    def propose(
        self, update_parts: Sequence[str], step_text: str, answer: str
    ) -> tuple[list[ChatMessage], dict[str, Any]]:
        """The next step's request, not yet taken: :meth:`commit` takes it (the step was
        accepted); a rejected step is simply never committed, and the step after it is proposed
        from the same point."""
        c = self.continuation
        messages = list(self._messages)
        extra: dict[str, Any] = {}
        if c.method == "turns":
            update = render_update(update_parts, self._t, ask_to_continue=True)
            if step_text:
                messages.append({"role": "assistant", "content": step_text})
                messages.append({"role": "user", "content": update})
            else:  # the previous step wrote nothing: its user turn just grows
                append_to_last_user(messages, update)
            request = list(messages)
        else:
            if update_parts:
                update = render_update(update_parts, self._t, ask_to_continue=False)
                append_to_last_user(messages, update)
            # Trailing whitespace is left out of the prefill (Anthropic refuses it, and
            # tokenizers continue a word boundary better without it); the joiner drops it if
            # it comes back.
            prefill = answer.rstrip()
            request = [*messages, c.prefill_message(prefill)] if prefill else list(messages)
            if prefill:
                extra = c.prefill_extra()
        self._pending = messages
        return request, extra

    def refresh(self, block: str, answer: str) -> tuple[list[ChatMessage], dict[str, Any]]:
        """The next step in the ``whole`` layout, not yet taken (:meth:`commit`): the first
        request with its reference block re-rendered as the references stand now (``block``,
        from :meth:`ReferenceTracker.block`), then the answer so far, as a prefill or as an
        assistant turn followed by the continue instruction. A server's prefix cache serves the
        request up to the first draft that grew."""
        c = self.continuation
        messages = self._with_block(block)
        prefill = answer.rstrip()
        extra: dict[str, Any] = {}
        if not prefill:
            request = list(messages)
        elif c.method == "turns":
            request = [
                *messages,
                {"role": "assistant", "content": prefill},
                {"role": "user", "content": self._t.continue_instruction},
            ]
        else:
            request = [*messages, c.prefill_message(prefill)]
            extra = c.prefill_extra()
        self._pending = messages
        return request, extra

    def commit(self) -> None:
        """The proposed step was accepted: later steps extend it."""
        if self._pending is not None:
            self._messages = self._pending
            self._pending = None
            self.steps += 1

    def switch(self, continuation: Continuation) -> None:
        """Continue by ``continuation`` from now on (the server refused prefill). The request
        so far stays as it is: its user message holds the updates given so far, and the next
        appended turn carries the whole answer so far as the assistant's."""
        self.continuation = continuation


# -- one seamless stream ---------------------------------------------------------------------


class Joiner:
    """Turns each step's deltas into the caller's one stream.

    At the start of a step (:meth:`begin`) it knows the answer so far and the prefill sent, if
    any. A prefill leaves out the answer's trailing whitespace, which the server then sends
    again at the start of its continuation: that is dropped. So is the prefill itself when the
    server echoes it (llama-server repeats it at the start of its first delta). After appended
    turns, a space the answer already ends with is not doubled. A step that begins mid-word
    needs nothing: its text is appended as it is.
    """

    __slots__ = ("_echo", "_held", "_space", "_started", "_withheld")

    def __init__(self) -> None:
        self._echo = ""
        self._held = ""
        self._withheld = ""
        self._space = False
        self._started = True

    def begin(self, answer: str, prefill: str | None = None, *, echoes: bool = False) -> None:
        """A new step: ``answer`` is what the caller has; ``prefill`` the answer as sent for the
        server to continue (``None``: appended turns); ``echoes``: the server repeats it."""
        if prefill is not None:
            self._withheld = answer[len(prefill) :] if answer.startswith(prefill) else ""
            self._space = False
        else:
            self._withheld = ""
            self._space = answer[-1:] in (" ", "\t")
        self._echo = prefill if (prefill and echoes) else ""
        self._held = ""
        self._started = False

    def feed(self, content: str) -> str:
        """The part of ``content`` to pass on (may be empty while an echo is being checked)."""
        if self._started:
            return content
        text = self._held + content
        echo = self._echo
        if echo:
            if len(text) < len(echo) and echo.startswith(text):
                self._held = text  # could still be the echo: wait for more
                return ""
            if text.startswith(echo):
                text = text[len(echo) :]
            self._echo = ""
        self._held = ""
        if not text:
            return ""
        withheld = self._withheld
        if withheld:
            if withheld.startswith(text):  # only whitespace the caller already has
                self._withheld = withheld[len(text) :]
                self._started = not self._withheld
                return ""
            if text.startswith(withheld):
                text = text[len(withheld) :]
            self._withheld = ""
        elif self._space:
            text = text.lstrip(" \t")
        if not text:
            return ""
        self._started = True
        return text

    def flush(self) -> str:
        """What was held back when the step ends (an unfinished possible echo)."""
        held, self._held = self._held, ""
        self._echo = ""
        return self.feed(held) if held else ""
