"""The read-ahead of a staircase's answer (see :mod:`moa_stream.engine._staircase_run`): the
text the current step wrote that is the answer's but that the caller has not been given yet,
and its spacing while a later step gets ready. :class:`ReadAhead` is also the caller's side of
the answer: every chunk the caller gets goes through :meth:`ReadAhead.emit`."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from moa_stream.engine.events import AggregatorDelta

if TYPE_CHECKING:
    from moa_stream.engine._staircase_steps import OpenStep, Pacer, StepPlan
    from moa_stream.engine.staircase import Staircase

__all__ = ["COVER_GAP", "MAX_COVER", "ReadAhead"]

#: A boundary (unless the answer waits for the references anyway) needs enough read-ahead for
#: one chunk every ``COVER_GAP`` seconds while the next step gets ready, up to ``MAX_COVER``.
COVER_GAP = 0.1
MAX_COVER = 8


class ReadAhead:
    """Up to ``limit`` chunks of the current step's text ahead of what the caller has been
    given, and the caller's stream itself, on the run's ``clock`` (its events' times from
    ``t0``), never more than ``max_pause`` apart for the staircase's sake.

    ``pieces`` holds the read-ahead as ``(text, chunks, the step's record)``, ``chunks`` of
    them: :meth:`push` adds to it, :meth:`pop` gives its first piece to the caller, and
    :meth:`release` gives what the caller may have now, in its turn (:meth:`turn`). While
    later steps may be asked, the caller's chunks are spaced out (:meth:`spacing`) from two
    moving averages: the time a later step takes to get ready (:meth:`step_took`, the first
    request's time to first token to begin with) and the time between the current stream's
    chunks (:meth:`chunk_read`). ``step`` is the step being read (its budget sets the spacing);
    ``given``, ``first_token_at`` and ``last_at`` are the caller's chunks so far, when the first
    reached it and when the last did; ``asked_at``, when the first step was asked."""

    __slots__ = (
        "answer",
        "asked_at",
        "chunks",
        "clock",
        "first_token_at",
        "given",
        "last_at",
        "limit",
        "max_pause",
        "pacer",
        "pieces",
        "plan",
        "read_at",
        "read_gap",
        "ready_dev",
        "step",
        "step_delta",
        "step_ready",
        "t0",
    )

    def __init__(
        self,
        answer: list[str],
        step_delta: Callable[[Any, str, float], None],
        pacer: Pacer,
        plan: StepPlan,
        staircase: Staircase,
        *,
        clock: Callable[[], float],
        t0: float,
    ) -> None:
        self.answer = answer  # what the caller has been given
        self.step_delta = step_delta  # the run's count of a delta a step passed on
        self.pacer = pacer
        self.plan = plan
        self.clock, self.t0 = clock, t0
        self.limit = staircase.read_ahead
        self.max_pause = staircase.max_pause
        self.pieces: deque[tuple[str, int, Any]] = deque()
        self.chunks = 0
        self.step: OpenStep | None = None
        self.given = 0  # content chunks of the answer passed on, whichever step wrote them
        self.first_token_at: float | None = None
        self.last_at: float | None = None
        # The moving averages of :meth:`spacing`: the time a later step takes to get ready,
        # its mean deviation, and the current stream's time between chunks.
        self.step_ready = 0.0
        self.ready_dev = 0.0
        self.read_gap = 0.0
        self.read_at: float | None = None
        self.asked_at = clock()

    # -- the caller's stream ------------------------------------------------------------------
    def emit(self, record: Any, text: str, chunks: int = 1) -> AggregatorDelta:
        """``text`` (``chunks`` of the step ``record``'s) goes to the caller now."""
        now = self.clock()
        self.given += chunks
        self.step_delta(record, text, now)
        if self.first_token_at is None:
            self.first_token_at = now
            self.step_ready = now - self.asked_at
            self.ready_dev = self.step_ready / 2
        self.last_at = now
        self.answer.append(text)
        return AggregatorDelta(text, now - self.t0)

    def push(self, text: str, chunks: int, record: Any) -> None:
        """``text`` is the answer's: the caller gets it in its turn (:meth:`release`)."""
        self.pieces.append((text, chunks, record))
        self.chunks += chunks
        self.pacer.passed(self.written(), chunks)

    def pop(self) -> AggregatorDelta:
        """The read-ahead's first piece goes to the caller now."""
        text, chunks, record = self.pieces.popleft()
        self.chunks -= chunks
        return self.emit(record, text, chunks)

    def release(self) -> list[AggregatorDelta]:
        """What the caller may have of the read-ahead now (see :meth:`turn`)."""
        out = []
        while self.pieces and self.turn(self.clock()) is None:
            out.append(self.pop())
        return out

    def flush(self) -> list[AggregatorDelta]:
        """All of the read-ahead goes to the caller now."""
        return [self.pop() for _ in range(len(self.pieces))]

    # -- the spacing --------------------------------------------------------------------------
    def turn(self, now: float) -> float | None:
        """``None`` if the read-ahead's next chunk may go to the caller now; otherwise when,
        in the spacing (:meth:`spacing`)."""
        if self.last_at is None:
            return None
        at = self.last_at + self.spacing()
        return None if now >= at else at

    def spacing(self) -> float:
        """The time between the caller's chunks that makes what the answer has ready last
        until the next step's first words: while later steps may be asked, the read-ahead and
        the rest of the current step's budget are spread over the time it takes to read that
        rest and to get the next step ready, as a slow step would (:meth:`ready_bound`)
        (``0``: no spacing, once no step will follow, or without a read-ahead). At most half
        of ``max_pause``."""
        step = self.step
        if not self.limit or step is None or step.final or not self.plan.stepping:
            return 0.0
        rest = max(0, step.budget - step.written)
        chunks = self.chunks + rest
        if not chunks:
            return 0.0
        span = rest * self.read_gap + self.ready_bound()
        return min(span / chunks, self.max_pause / 2)

    def ready_bound(self) -> float:
        """The time to plan for a later step to get ready: the mean so far plus twice its mean
        deviation (as TCP bounds a round trip), so that a step slower than most still finds
        the caller's stream going."""
        return self.step_ready + 2 * self.ready_dev

    def cover(self) -> int:
        """The read-ahead a boundary needs so that, spaced out while the next step gets
        ready, the caller's chunks come at most :data:`COVER_GAP` apart; at most
        :data:`MAX_COVER` chunks (or the whole read-ahead)."""
        if not self.limit:
            return 0
        # n chunks spaced out and then the step's first: n + 1 gaps
        needed = math.ceil(self.ready_bound() / COVER_GAP) - 1
        return max(0, min(self.limit, MAX_COVER, needed))

    def step_took(self, seconds: float) -> None:
        """A later step got ready (or was given up on) ``seconds`` after it was asked."""
        ready = min(seconds, 2 * self.max_pause)
        self.ready_dev += (abs(ready - self.step_ready) - self.ready_dev) * 0.5
        self.step_ready += (ready - self.step_ready) * 0.5

    def chunk_read(self) -> None:
        """The current stream wrote a content chunk now."""
        now = self.clock()
        if self.read_at is not None:
            gap = min(now - self.read_at, self.max_pause)
            self.read_gap += (gap - self.read_gap) * 0.2
        self.read_at = now

    # -- the answer so far --------------------------------------------------------------------
    def written(self) -> int:
        """Content chunks of the answer written so far, the read-ahead's included."""
        return self.given + self.chunks

    def text(self) -> str:
        """The read-ahead's text."""
        return "".join(piece for piece, _, _ in self.pieces)

    def answer_text(self) -> str:
        """The answer as the next step continues it: what the caller has and the read-ahead."""
        text = "".join(self.answer)
        if self.pieces:
            text += self.text()
        return text

    def answer_chars(self) -> int:
        return sum(map(len, self.answer)) + len(self.text())

    def tail(self) -> str:
        """The end of the answer so far (the caller's last 64 pieces and the read-ahead)."""
        tail = "".join(self.answer[-64:])
        if self.pieces:
            tail += self.text()
        return tail

    def last_char(self) -> str:
        if self.pieces:
            return self.pieces[-1][0][-1:]
        return self.answer[-1][-1:] if self.answer else ""

    def pause_end(self) -> float:
        """Where a wait must end: ``max_pause`` after the caller's last chunk (or from now,
        before the first), so that no gap in the caller's stream is longer."""
        last = self.last_at if self.last_at is not None else self.clock()
        return last + self.max_pause
