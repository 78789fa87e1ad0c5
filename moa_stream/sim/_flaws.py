"""How an imperfect model continues an answer. Pure: no I/O, no clock.

A model asked to continue an answer (see :mod:`moa_stream.sim._continue`) is supposed to go on
from the last character. Real ones often do not, and how often depends on the model and on
where the answer was cut; :class:`~moa_stream.sim.profiles.ContinuationProfile` gives the
probabilities, and :func:`continue_with_flaws` turns the exact continuation the planner drew
into the one such a model writes:

- a *restart* restates the opening of the answer so far (its first sentence, or its first line
  when that has no sentence end) and then goes on with the rest, on a new line after a prefill
  and at once after a "continue" turn, as a new turn begins. Seen on SmolLM2-135M:
  ``"The sky is blue."`` continued as ``" \\nThe sky is indeed blue, ..."``;
- an *early stop* (after a "continue" turn only) gives a few words of the restatement and ends
  the reply with ``finish_reason: "stop"``, as if the answer were complete;
- a *markup copy* puts a piece of the request's own markup at the start of the reply or between
  two of its words: its last closing tag (``</draft>``), its last opening tag (a
  ``<draft n="1" ... continued>`` line), or a sentence of the text that follows a quoted block
  (the instructions). The pieces are read from the request, not from the engine's templates,
  so a change of templates changes what is copied, as it would with a real model;
- a *refusal* of a prefill is decided here too; the routes write the 400;
- a *loop* answers a fresh request that quotes only short drafts (an aggregator started on a
  few sentences of each) with the reply's first sentence, over and over: SmolLM2-135M, given
  one or two sentences of three drafts, wrote "Deeper than a lifetime in the ocean." thirty
  times, where complete drafts drew an ordinary answer (:func:`loop_on_short_drafts`).

Every choice is drawn from the caller's seeded :class:`random.Random` in a fixed order, once per
request and before the reply starts, so nothing here touches the streaming path.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from moa_stream.sim.profiles import ContinuationProfile

__all__ = [
    "PREFILL_REFUSAL",
    "Flaw",
    "FlawedReply",
    "continue_with_flaws",
    "ends_at_boundary",
    "loop_on_short_drafts",
    "markup_pieces",
    "opening_of",
]

#: What Anthropic answers a prefill on models without prefill support, word for word.
PREFILL_REFUSAL = (
    "This model does not support assistant message prefill. "
    "The conversation must end with a user message."
)

#: A way a continuation went wrong, as :attr:`SimRecord.continuation_flaws` lists them.
Flaw = Literal["refused", "restart", "early_stop", "markup", "loop"]

#: Quoted drafts averaging fewer words than this are short (see :func:`loop_on_short_drafts`).
SHORT_DRAFT_WORDS = 40

# A sentence end: a full stop, question or exclamation mark, then closing quotes or brackets.
_CLOSERS = "\"')\\]*_\u201d\u2019"
_SENTENCE_END = re.compile(f"[.!?\u2026][{_CLOSERS}]*(?=\\s|$)")
_SENTENCE_END_AT_END = re.compile(f"[.!?\u2026][{_CLOSERS}]*$")
# A tag: <name ...>, </name>. One line at most, so prose with a stray "<" matches nothing.
_TAG = re.compile(r"<(/?)([A-Za-z][\w-]*)(?:\s[^<>\n]*)?>")
# A sentence of prose: a capital, no line break, a sentence end.
_SENTENCE = re.compile(r"[A-Z][^.!?\n<>]{8,}[.!?]")
# A restatement never runs longer than this many words (a first "sentence" may be a paragraph).
_MAX_OPENING_WORDS = 24
_WORD = re.compile(r"\S+\s*|\s+")


@dataclass(frozen=True, slots=True)
class FlawedReply:
    """The continuation a model with flaws writes: its ``tokens``, whether it stops early, and
    the flaws it shows (empty: it continued exactly)."""

    tokens: list[str]
    stopped_early: bool = False
    flaws: tuple[Flaw, ...] = ()

    @property
    def refused(self) -> bool:
        """Whether the request is refused (then ``tokens`` is empty)."""
        return "refused" in self.flaws


def _words(text: str) -> list[str]:
    """``text`` as word tokens, each with its trailing whitespace ("".join gives it back)."""
    return _WORD.findall(text)


def ends_at_boundary(answer: str) -> bool:
    """Whether an answer so far ends a sentence or a line: a prefill there invites a model to
    begin something new, where one cut mid-sentence is usually finished."""
    if answer.rstrip(" \t").endswith("\n") or not answer.strip():
        return True
    return _SENTENCE_END_AT_END.search(answer.rstrip()) is not None


def opening_of(answer: str) -> str:
    """What a restart restates: the answer's first sentence, or its first line when that has
    no sentence end, at most :data:`_MAX_OPENING_WORDS` words."""
    line = answer.lstrip().split("\n", 1)[0]
    match = _SENTENCE_END.search(line)
    head = line[: match.end()] if match is not None else line
    words = head.split()
    if len(words) > _MAX_OPENING_WORDS:
        return " ".join(words[:_MAX_OPENING_WORDS])
    return head.strip()


def _last_user(messages: Sequence[tuple[str, str]]) -> str:
    for role, content in reversed(messages):
        if role == "user":
            return content
    return ""


def markup_pieces(messages: Sequence[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """The markup a model could copy from a request: (tags, sentences).

    Tags are the last closing tag and the last opening tag of the last user message (the text
    the model read last); sentences are those of the last stretch of plain text that follows a
    closed tag there (the instructions after the quoted blocks, or an update's header).
    """
    text = _last_user(messages)
    tags = list(_TAG.finditer(text))
    if not tags:
        return [], []
    closing = [m for m in tags if m.group(1)]
    opening = [m for m in tags if not m.group(1)]
    pieces: list[str] = []
    if closing:
        pieces.append(closing[-1].group(0))
    if opening:
        pieces.append(opening[-1].group(0))
    sentences: list[str] = []
    for m in reversed(closing):
        after = next((t.start() for t in opening if t.start() >= m.end()), len(text))
        sentences = _SENTENCE.findall(text, m.end(), after)
        if sentences:
            break
    return pieces, sentences


# A quoted block: an opening tag, its text, the matching closing tag.
_QUOTED = re.compile(r"<([A-Za-z][\w-]*)(?:\s[^<>\n]*)?>(.*?)</\1>", re.DOTALL)


def loop_on_short_drafts(
    profile: ContinuationProfile,
    tokens: list[str],
    messages: Sequence[tuple[str, str]],
    rng: random.Random,
) -> list[str] | None:
    """The reply to a fresh request by a model that loops on short drafts: its planned
    ``tokens``' first sentence repeated (each on a line of its own) to their number, or
    ``None`` (the reply stands). Rolls only for a request whose last user message quotes
    blocks averaging fewer than :data:`SHORT_DRAFT_WORDS` words."""
    if not profile.loop_on_short_drafts or not tokens:
        return None
    blocks = _QUOTED.findall(_last_user(messages))
    if not blocks:
        return None
    words = sum(len(text.split()) for _, text in blocks) / len(blocks)
    if words >= SHORT_DRAFT_WORDS or rng.random() >= profile.loop_on_short_drafts:
        return None
    sentence = opening_of("".join(tokens))
    unit = _words(sentence + "\n\n")
    if not sentence or len(unit) >= len(tokens):
        return None
    out: list[str] = []
    while len(out) < len(tokens):
        out.extend(unit)
    return out[: len(tokens)]


def _rolls(rng: random.Random) -> tuple[float, float, float, float]:
    # Always four draws, in this order, so one decision never shifts another's.
    return rng.random(), rng.random(), rng.random(), rng.random()


def continue_with_flaws(
    profile: ContinuationProfile,
    kind: Literal["prefill", "turns"],
    answer: str,
    rest: list[str],
    *,
    rest_is_whole: bool,
    messages: Sequence[tuple[str, str]],
    rng: random.Random,
) -> FlawedReply:
    """The continuation of ``answer`` by a model with ``profile``.

    ``rest`` is the exact continuation; ``rest_is_whole`` says it begins at a token boundary
    (not with the end of a word the answer cut). ``messages`` is the whole request, for the
    markup a model may copy. Call only for a profile that is not perfect: the draws it makes
    are the only cost.
    """
    refuse, restart, stop, copy = _rolls(rng)
    if kind == "prefill" and refuse < profile.refuse_prefill:
        return FlawedReply([], flaws=("refused",))

    flaws: list[Flaw] = []
    tokens = rest
    stopped = False
    if kind == "prefill":
        p = (
            profile.restart_at_boundary
            if ends_at_boundary(answer)
            else profile.restart_mid_sentence
        )
    else:
        p = profile.restart_after_turn
    opening = opening_of(answer) if restart < p else ""
    if opening:
        flaws.append("restart")
        said = _words(opening)
        if kind == "turns" and stop < profile.stop_after_restart:
            flaws.append("early_stop")
            stopped = True
            tokens = said[: rng.randint(2, 8)]
            tokens[-1] = tokens[-1].rstrip()
        else:
            lead: list[str] = []
            if kind == "prefill":
                lead = ["\n" if answer[-1:].isspace() else " \n"]
            if opening == answer.strip():
                # The whole answer so far is restated; the exact rest follows it, as it did
                # the answer (finishing a word the answer cut).
                tokens = [*lead, *_words(answer.lstrip()), *rest]
            else:
                # The opening sentence, then the rest from its next whole word.
                whole = rest if rest_is_whole or not rest else rest[1:]
                tokens = [*lead, *_words(opening + (" " if whole else "")), *whole]

    if copy < profile.copy_markup:
        tags, sentences = markup_pieces(messages)
        pieces = [*tags, *sentences]
        if pieces:
            piece = pieces[rng.randrange(len(pieces))]
            is_tag = piece.startswith("<")
            at = 0 if not tokens or rng.random() < 0.5 else rng.randint(1, len(tokens))
            if at == 0 and kind == "prefill" and not flaws and not rest_is_whole:
                at = 1  # not inside the word the prefill cut: after its end
            before = tokens[at - 1] if at else (answer if kind == "prefill" else "\n")
            # A tag goes on a line of its own, a sentence between two words.
            if is_tag:
                gap = "" if before.endswith("\n") else "\n"
            else:
                gap = "" if before[-1:].isspace() else " "
            inserted = [gap + piece + ("\n" if is_tag else " ")]
            tokens = [*tokens[:at], *inserted, *tokens[at:]]
            flaws.append("markup")
    return FlawedReply(tokens, stopped, tuple(flaws))
