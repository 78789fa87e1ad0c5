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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from moa_stream._exceptions import ConfigError
from moa_stream._types import ChatMessage
from moa_stream.engine.events import ReferenceInfo, ReferenceStatus
from moa_stream.engine.layer import Reference
from moa_stream.engine.prompts import (
    PromptTemplates,
    append_to_last_user,
    render_draft,
    render_references,
    render_update,
    with_system_prompt,
)

__all__ = [
    "CONTINUATION_METHODS",
    "PREFILL_FLAVOURS",
    "Continuation",
    "RefView",
    "Joiner",
    "ReferenceTracker",
    "Staircase",
    "StepPrompts",
    "parse_steps",
    "stable_length",
    "step_sizes",
]

ContinuationMethod = Literal["prefill", "turns"]
PrefillFlavour = Literal["vllm", "llama", "prefix", "anthropic"]

CONTINUATION_METHODS: tuple[ContinuationMethod, ...] = ("prefill", "turns")
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
    step sees what they wrote since. ``steps``: the step schedule in aggregator tokens (the last
    size repeats). ``lead``: at a step boundary the next step waits until the answer is at most
    this many tokens ahead of every reference still being written (``None``: never waits), so the
    answer's conclusion is written from finished references rather than openings.
    ``give_up_after``: seconds after the start rule fired at which references still running are
    given up on (and, if the layer's stragglers are ``cancel``, cancelled); ``None``: never.
    ``continuation``: how answers are continued, per aggregator name, with ``default`` for the
    others.
    """

    steps: tuple[int, ...] = (8, 16, 32, 64, 128)
    lead: int | None = 32
    give_up_after: float | None = None
    default: Continuation = field(default_factory=Continuation)
    continuation: Mapping[str, Continuation] = field(default_factory=dict)

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

    def for_agent(self, name: str) -> Continuation:
        return self.continuation.get(name, self.default)


# -- what a reference may hand over ----------------------------------------------------------

_SENTENCE_END = re.compile(r"[.!?;]\s|\n")
_SHORT_TAIL = 24


def _last_sentence_end(text: str) -> int:
    """End of the last sentence end or line break in ``text`` (0: none). Searched from the end
    in growing windows: it is asked at every step boundary, of texts that only grow."""
    end = len(text)
    window = 256
    while True:
        start = max(0, end - window)
        cut = 0
        for match in _SENTENCE_END.finditer(text, start):
            cut = match.end()
        if cut or start == 0:
            return cut
        window *= 4


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

    def __init__(self, templates: PromptTemplates, max_reference_chars: int | None) -> None:
        self._t = templates
        self._cap = max_reference_chars
        self._given: dict[int, _Given] = {}

    def _limit(self, n: int) -> int:
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
            n = self._limit(stable_length(text, status == "complete"))
            if n == 0 and status == "partial":
                continue
            number = len(self._given) + 1
            self._given[index] = _Given(number, n, status)
            quoted.append(Reference(str(index), index, status, text[:n]))  # type: ignore[arg-type]
            numbers.append(number)
        return render_references(quoted, self._t, numbers=numbers)

    def gains(self, refs: Sequence[RefView], *, given_up: bool = False) -> list[str]:
        """The rendered additions since the last step (empty: nothing new), and records them
        as given. ``given_up``: references still running are reported as given up on."""
        parts: list[str] = []
        for index, _, state, text in refs:
            status = self._status(state, given_up)
            if status is None:
                continue
            n = self._limit(stable_length(text, status == "complete"))
            given = self._given.get(index)
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

    def has_news(self, refs: Sequence[RefView], *, given_up: bool = False) -> bool:
        """Whether :meth:`gains` would report anything (it records nothing)."""
        for index, _, state, text in refs:
            status = self._status(state, given_up)
            if status is None:
                continue
            given = self._given.get(index)
            if given is None:
                if status != "cancelled" and (status != "partial" or stable_length(text, False)):
                    return True
                continue
            if status != given.status:
                return True
            if status in ("partial", "complete"):
                n = self._limit(stable_length(text, status == "complete"))
                if n > given.chars:
                    return True
        return False

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
        self.steps = 0

    def first(self, reference_block: str) -> list[ChatMessage]:
        """The first step: the one-shot aggregator prompt."""
        self._messages = append_to_last_user(list(self._base), reference_block)
        self.steps = 1
        return list(self._messages)

    def next(
        self, update_parts: Sequence[str], step_text: str, answer: str
    ) -> tuple[list[ChatMessage], dict[str, Any]]:
        """The next step, after the previous step wrote ``step_text`` (the answer so far is
        ``answer``); ``update_parts`` come from :meth:`ReferenceTracker.gains`."""
        self.steps += 1
        c = self.continuation
        if c.method == "turns":
            update = render_update(update_parts, self._t, ask_to_continue=True)
            if step_text:
                self._messages.append({"role": "assistant", "content": step_text})
                self._messages.append({"role": "user", "content": update})
            else:  # the previous step wrote nothing: its user turn just grows
                append_to_last_user(self._messages, update)
            return list(self._messages), {}
        update = render_update(update_parts, self._t, ask_to_continue=False)
        append_to_last_user(self._messages, update)
        # Trailing whitespace is left out of the prefill (Anthropic refuses it, and tokenizers
        # continue a word boundary better without it); the joiner drops it if it comes back.
        prefill = answer.rstrip()
        if not prefill:
            return list(self._messages), {}
        return [*self._messages, c.prefill_message(prefill)], c.prefill_extra()


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
