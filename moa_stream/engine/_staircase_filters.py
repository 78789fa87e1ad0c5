"""The filters of a staircase's answer (see :mod:`moa_stream.engine._staircase_run`): what of
the text of the step being read is the answer's, and what they dropped over the run."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog

from moa_stream.engine.staircase import MarkupFilter, RepetitionGate

if TYPE_CHECKING:
    from moa_stream.engine._staircase_readahead import ReadAhead
    from moa_stream.engine.staircase import Joiner

__all__ = ["NOTHING_BUT_PROMPT", "AnswerFilters"]

_log = structlog.get_logger("moa_stream.staircase")

#: How an answer broke when nothing but what its filters dropped was left of it.
NOTHING_BUT_PROMPT = "nothing but prompt text"


class AnswerFilters:
    """The step's text goes through ``markup`` (a
    :class:`~moa_stream.engine.staircase.MarkupFilter`: draft tags, template tokens) and then
    ``gate`` (the :class:`~moa_stream.engine.staircase.RepetitionGate`: restarts, loops, the
    prompt's own sentences) before it is the answer's; ``held`` counts the chunks whose text
    they hold. A step that takes over starts afresh (:meth:`taken_over`)."""

    __slots__ = ("gate", "held", "markup", "markup_dropped")

    def __init__(self, loop_restarts: int, prompt: tuple[str, ...]) -> None:
        self.gate = RepetitionGate(words=4, limit=loop_restarts, prompt=prompt)
        self.markup = MarkupFilter()
        self.markup_dropped = 0  # tags dropped by the markup filters of earlier steps
        self.held = 0  # chunks whose text is held (by the repetition gate, mostly)

    def taken_over(self) -> None:
        """Another step's stream takes over: what this one had begun is not the answer."""
        self.markup_dropped += self.markup.dropped
        self.markup = MarkupFilter()
        self.gate.drop()
        self.held = 0

    def rest(self, joiner: Joiner, ahead: ReadAhead) -> str:
        """What the filters (and ``joiner``) still hold once the stream ended, as they let it
        go (the gate drops a restart or the prompt's text in it)."""
        answer_text = ahead.answer_text
        rest = self.markup.feed(joiner.flush()) + self.markup.flush()
        if rest:
            rest = self.gate.feed(rest, ahead.last_char(), answer_text)
        rest += self.gate.flush(lambda: answer_text() + rest)
        return rest

    def ended(self, agent: str, step: int) -> None:
        """The answer ended at step ``step``: what the gate saw, logged."""
        gate = self.gate
        if gate.parroted:
            _log.info("staircase.prompt_text_dropped", agent=agent, sentences=gate.parroted)
        if gate.looping:
            _log.info(
                "staircase.answer_looping",
                agent=agent,
                step=step,
                restarts=gate.restarts,
                repeats=gate.repeats,
            )

    def broke(self, answer_text: Callable[[], str]) -> list[str]:
        """How the answer broke, as an early start counts it: it looped, or nothing but what
        the filters dropped (prompt text, markup) was left of it (``answer_text``); a dropped
        sentence or tag in an answer that goes on leaves it whole."""
        dropped = self.gate.parroted or self.markup_dropped + self.markup.dropped
        return [
            reason
            for reason, seen in (
                ("loop", self.gate.looping),
                (NOTHING_BUT_PROMPT, dropped and not answer_text().strip()),
            )
            if seen
        ]
