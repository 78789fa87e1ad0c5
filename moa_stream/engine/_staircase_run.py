"""Driving a staircase aggregator: the I/O around :mod:`moa_stream.engine.staircase`.

The run hands over through a small :class:`StaircaseHost`: the references of the last layer as
they stand, a way to take in what the proposers sent meanwhile (``drain`` without waiting,
``wait`` for more), and the book-keeping of each step's request. The current step's stream is
read here, in the run's own task, so a token reaches the caller in the loop turn it was parsed
in (while later steps may be asked, in its turn of the read-ahead below); between two deltas the
proposers' queued chunks are drained (no wait, no queue hop for the answer) so that, at a step
boundary, the references are as fresh as they can be. Falling back to the next aggregator is the
shared loop's (:func:`~moa_stream.engine.aggregate.aggregate`); :class:`StaircaseStrategy`
starts each aggregator's try there.

A step boundary comes, at the next word that starts inside a sentence
(:func:`~moa_stream.engine.staircase.cut_point`), once the step wrote its budget of tokens,
once the answer has to wait for the references anyway (see pacing below: the next step gets
ready during that wait), or at once when every reference has ended since the step was asked.
There the current stream is *paused*, not closed (its tokens wait in the connection):

1. unless the references gained enough since the last step (``min_news``), or a step limit or
   the context window says no, the current stream just goes on;
2. the next step is asked, and its first words are held by a
   :class:`~moa_stream.engine.staircase.ContinuationGuard`. Accepted: the current stream is
   closed and the next one takes over, its held words first. Rejected (restart, markup,
   instruction text, an early end, an error, or not ready within ``max_pause``): the next
   stream is closed and the current one goes on from where it paused, as if nothing happened.

**Read-ahead.** The current stream is read up to ``read_ahead`` chunks ahead of what the caller
has been given; while later steps may be asked, the caller's chunks are spaced out so that what
is ready lasts until the next step's first words (:meth:`_Driver._spacing`). The next step is
asked with the read-ahead in its prefix and tried in a task of its own while the caller is given
it (:meth:`_Driver._overlap`), so its time to first token does not stop the stream.

**Pacing.** Within ``lead`` chunks of every reference still being written the answer runs free;
further ahead of one, the stream is read on only as that reference writes two chunks for each of
the answer's, so the answer slows down steadily (rather than stopping) until the reference
catches up, and it ends after the references it follows. A reference that writes nothing for
``max_pause`` while the answer waits for it is left behind; references that have not started are
not waited for. Pacing stops with the stepping: once no later step will be asked, nothing reads
what the references add.

**Repetition.** A :class:`~moa_stream.engine.staircase.RepetitionGate` holds the first words of
each sentence until they can be compared with the sentences before; an answer that restarts
itself twice ends at the sentence end before the second, and the aggregator's next runs start
once every reference has ended (:mod:`moa_stream.engine._staircase_steps` keeps that memory,
per provider object and model, with the back-off of late steps and refused prefills).

So the caller never waits longer than ``max_pause`` for the next chunk, every reference a step
took is only counted as given if that step was accepted, and an error of a later step never
reaches the caller: the previous step's answer is still there to finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from moa_stream._exceptions import AggregatorError, ProviderError
from moa_stream._types import ChatMessage, ChatRequest, Usage
from moa_stream.engine._staircase_steps import (
    EARLY_START,
    LATE,
    Pacer,
    Rejected,
    StepPlan,
    Trial,
    early_start_broke,
    step_request,
    try_step,
    wait_until,
)
from moa_stream.engine.aggregate import Steps
from moa_stream.engine.events import (
    AggregatorDelta,
    AggregatorDone,
    AggregatorStep,
    AggregatorStepRejected,
    Event,
)
from moa_stream.engine.staircase import (
    ContinuationGuard,
    Joiner,
    MarkupFilter,
    ReferenceTracker,
    RefView,
    RepetitionGate,
    cut_point,
    stable_length,
)

if TYPE_CHECKING:
    from moa_stream.engine.spec import Agent, MoA
    from moa_stream.providers import ProviderStream

__all__ = ["StaircaseHost", "StaircaseStrategy"]


class StaircaseHost(Protocol):
    """What the run provides to the staircase (see the module docstring)."""

    def references(self) -> list[RefView]: ...

    def running_chunks(self) -> list[tuple[int, int]]:
        """``(index, content chunks so far)`` of each reference still being written."""
        ...

    def drain(self) -> Sequence[Event]:
        """Take in everything the proposers already sent; the events it makes."""
        ...

    async def wait(self, until: float | None) -> list[Event]:
        """Wait for the proposers to send something (or until ``until`` on the run's clock),
        take it in; the events it makes."""
        ...

    def give_up(self) -> None:
        """The references still running are given up on (the layer's stragglers policy)."""
        ...

    def open_step(
        self, agent: Agent, step: int, messages: Sequence[ChatMessage], stream: ProviderStream
    ) -> Any:
        """Record a step's request; returns its record."""
        ...

    def step_delta(self, record: Any, text: str, now: float) -> None:
        """Count a delta the step passed on (``text`` may be empty: a joined-away piece)."""
        ...

    def close_step(
        self, record: Any, status: str, finish_reason: str | None, error: BaseException | None
    ) -> None: ...


_log = structlog.get_logger("moa_stream.staircase")

#: A boundary (unless the answer waits for the references anyway) needs enough read-ahead for
#: one chunk every ``COVER_GAP`` seconds while the next step gets ready, up to ``MAX_COVER``.
COVER_GAP = 0.1
MAX_COVER = 8


@dataclass(slots=True)
class _Step:
    """The step whose stream the caller is reading."""

    number: int
    stream: ProviderStream
    record: Any
    joiner: Joiner
    budget: int
    final: bool
    written: int = 0
    ended: bool = False


class StaircaseStrategy:
    """The staircase as a strategy of :func:`~moa_stream.engine.aggregate.aggregate`: each
    try is one aggregator's :class:`_Driver`, whose events the loop passes on. Its usage adds
    up every step's request; a failure of the step being read, once a token reached the
    caller, raises :class:`AggregatorError` with the answer so far (the loop falls back before
    that). ``give_up_after`` counts from the staircase's start, whichever aggregator is on."""

    def __init__(
        self,
        host: StaircaseHost,
        spec: MoA,
        messages: Sequence[ChatMessage],
        answer: list[str],
        *,
        clock: Callable[[], float],
        t0: float,
        temperature: float | None,
        max_tokens: int | None,
        stop: tuple[str, ...] | None,
    ) -> None:
        staircase = spec.staircase
        assert staircase is not None
        self.host = host
        self.spec = spec
        self.staircase = staircase
        self.messages = messages
        self.answer = answer
        self.clock = clock
        self.t0 = t0
        self.overrides = (temperature, max_tokens, stop)
        started_at = clock()
        self.give_up_at: float | None = None
        if staircase.give_up_after is not None:
            self.give_up_at = started_at + staircase.give_up_after

    async def begin(self, attempt: int, agent: Agent) -> Steps:
        driver = _Driver(self, agent)
        return Steps(driver.asked_at, driver.run(), driver)


class _Driver:
    """One aggregator's staircase (see the module docstring)."""

    def __init__(self, stairs: StaircaseStrategy, agent: Agent, *, late: bool = False) -> None:
        # The run's side of things, as the strategy holds it for each aggregator's try.
        self.stairs = stairs
        host, staircase = stairs.host, stairs.staircase
        self.host, self.staircase, self.agent = host, staircase, agent
        self.answer, self.clock, self.t0 = stairs.answer, stairs.clock, stairs.t0
        self.give_up_at, self.overrides = stairs.give_up_at, stairs.overrides
        self.plan = StepPlan(staircase, stairs.spec, agent, stairs.messages)
        self.start_late = late or EARLY_START.suspended(agent)
        self.early = False  # the first request had a reference still being written
        self.markup_dropped = 0  # tags dropped by the markup filters of earlier steps
        self.gate = RepetitionGate(
            words=4, limit=staircase.loop_restarts or 0, prompt=self.plan.instructions
        )
        self.pacer = Pacer(staircase.lead, host.running_chunks)
        self.given_up = False
        self.usage = Usage()  # of the steps closed so far
        self.first_token_at: float | None = None
        self.last_at: float | None = None  # when the caller got the last chunk
        self.chunks = 0  # content chunks of the answer passed on, whichever step wrote them
        self.markup = MarkupFilter()
        self.held = 0  # chunks whose text is held (by the repetition gate, mostly)
        # The read-ahead: text the current step wrote that is the answer's (a later step
        # continues after it) but that the caller has not been given yet, as (text, chunks,
        # the step's record); ``ahead_chunks`` of them.
        self.read_ahead = staircase.read_ahead
        self.ahead: deque[tuple[str, int, Any]] = deque()
        self.ahead_chunks = 0
        # For spacing the read-ahead out (:meth:`_spacing`): the time a later step takes to
        # get ready, its mean deviation, and the current stream's time between chunks (moving
        # averages).
        self.step_ready = 0.0
        self.ready_dev = 0.0
        self.read_gap = 0.0
        self.read_at: float | None = None
        self.reading: asyncio.Future[Any] | None = None  # a read of the stream, in a task
        self.asked_at = self.clock()
        self.done = False
        self.error: ProviderError | None = None
        self.cur: _Step | None = None

    # -- the caller's stream ----------------------------------------------------------------
    def _emit(self, record: Any, text: str, chunks: int = 1) -> AggregatorDelta:
        now = self.clock()
        self.chunks += chunks
        self.host.step_delta(record, text, now)
        if self.first_token_at is None:
            self.first_token_at = now
            self.step_ready = now - self.asked_at
            self.ready_dev = self.step_ready / 2
        self.last_at = now
        self.answer.append(text)
        return AggregatorDelta(text, now - self.t0)

    def _push(self, text: str, chunks: int, record: Any) -> None:
        """``text`` is the answer's: the caller gets it in its turn (:meth:`_release`)."""
        self.ahead.append((text, chunks, record))
        self.ahead_chunks += chunks
        self.pacer.passed(self._written(), chunks)

    def _pop(self) -> AggregatorDelta:
        text, chunks, record = self.ahead.popleft()
        self.ahead_chunks -= chunks
        return self._emit(record, text, chunks)

    def _release(self) -> list[AggregatorDelta]:
        """What the caller may have of the read-ahead now (see :meth:`_turn`)."""
        out = []
        while self.ahead and self._turn(self.clock()) is None:
            out.append(self._pop())
        return out

    def _turn(self, now: float) -> float | None:
        """``None`` if the read-ahead's next chunk may go to the caller now; otherwise when,
        in the spacing (:meth:`_spacing`)."""
        if self.last_at is None:
            return None
        at = self.last_at + self._spacing()
        return None if now >= at else at

    def _spacing(self) -> float:
        """The time between the caller's chunks that makes what the answer has ready last
        until the next step's first words: while later steps may be asked, the read-ahead and
        the rest of the current step's budget are spread over the time it takes to read that
        rest and to get the next step ready, as a slow step would (:meth:`_ready_bound`)
        (``0``: no spacing, once no step will follow, or without a read-ahead). At most half
        of ``max_pause``."""
        step = self.cur
        if not self.read_ahead or step is None or step.final or not self.plan.stepping:
            return 0.0
        rest = max(0, step.budget - step.written)
        chunks = self.ahead_chunks + rest
        if not chunks:
            return 0.0
        span = rest * self.read_gap + self._ready_bound()
        return min(span / chunks, self.staircase.max_pause / 2)

    def _ready_bound(self) -> float:
        """The time to plan for a later step to get ready: the mean so far plus twice its mean
        deviation (as TCP bounds a round trip), so that a step slower than most still finds
        the caller's stream going."""
        return self.step_ready + 2 * self.ready_dev

    async def _stop_reading(self) -> None:
        """Cancel a read of the stream still in its task (the stream is closed next)."""
        reading, self.reading = self.reading, None
        if reading is None:
            return
        if not reading.done():
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reading
        elif not reading.cancelled():
            reading.exception()  # retrieved: the error that ended the run is raised instead

    def _flush(self) -> list[AggregatorDelta]:
        return [self._pop() for _ in range(len(self.ahead))]

    def _request(self, messages: list[ChatMessage], extra: dict[str, Any]) -> ChatRequest:
        return step_request(self.agent, self.overrides, self._written(), messages, extra)

    async def run(self) -> AsyncGenerator[Event, None]:
        host = self.host
        plan = self.plan
        if self.start_late or plan.whole or not _quotable(host.references):
            # The late start waits for every reference to end (or to be given up on); the
            # whole layout, which quotes only whole sentences, waits at most ``max_pause`` for
            # each running reference's first one (a draft cut mid-sentence is what a small
            # model copies and loops on; a few whole sentences are what it can build on); the
            # updates layout waits at most as long for a first reference with text to quote
            # (a policy may fire on a few tokens, fewer than a quote takes).
            if self.start_late:
                done, until = partial(_all_ended, host.references), self.give_up_at
            elif plan.whole:
                done, until = partial(_sentences, host.references), self._pause_end()
            else:
                done, until = partial(_quotable, host.references), self._pause_end()
            if self.give_up_at is not None:
                until = min(until or self.give_up_at, self.give_up_at)
            async for event in wait_until(done, host.wait, self.clock, until):
                yield event
            self._check_give_up()
            self.asked_at = self.clock()
        refs = host.references()
        request_messages = plan.first(refs)
        final = plan.tracker.settled(refs)
        self.early = not final
        yield self._step_event(0, refs, final)
        stream = self.agent.provider.stream(self._request(request_messages, {}))
        record = host.open_step(self.agent, 0, request_messages, stream)
        joiner = Joiner()
        joiner.begin("".join(self.answer))
        step = self.cur = _Step(0, stream, record, joiner, next(plan.sizes), final)
        try:
            await stream.__aenter__()
        except ProviderError as exc:
            await stream.aclose()
            host.close_step(record, "failed", None, exc)
            self.error = exc
            return
        except BaseException as exc:
            await stream.aclose()
            host.close_step(record, "cancelled", None, exc)
            raise
        try:
            while True:
                step = self.cur
                if step.ended:
                    break
                if self.ahead and self.ahead_chunks >= self.read_ahead:
                    # The read-ahead is full: its next chunk goes in its turn, then the
                    # stream is read on.
                    while (until := self._turn(self.clock())) is not None:
                        for event in await host.wait(until):
                            yield event
                        self._check_give_up()
                    yield self._pop()
                    continue
                if self._pacing():
                    async for event in self._pace():
                        yield event
                try:
                    if self.ahead and self._spacing():
                        # The read-ahead goes on in its turn while the stream is read: a stall
                        # of the stream does not stop the caller's.
                        reading = self.reading = asyncio.ensure_future(step.stream.__anext__())
                        while not reading.done():
                            until = self._turn(self.clock()) if self.ahead else None
                            if self.ahead and until is None:
                                yield self._pop()
                                continue
                            timeout = None if until is None else max(0.0, until - self.clock())
                            await asyncio.wait((reading,), timeout=timeout)
                        self.reading = None
                        delta = reading.result()
                    else:
                        delta = await step.stream.__anext__()
                except StopAsyncIteration:
                    break
                content = delta.content
                if content:
                    step.written += 1
                    now = self.clock()
                    if self.read_at is not None:
                        gap = min(now - self.read_at, self.staircase.max_pause)
                        self.read_gap += (gap - self.read_gap) * 0.2
                    self.read_at = now
                    text = self.markup.feed(step.joiner.feed(content))
                    if text:
                        text = self.gate.feed(text, self._last_char(), self._answer_text)
                        if self.gate.looping:
                            # The answer ends: with the sentence that made the loop when only
                            # its end showed it (a repeat), before it when its opening did.
                            if text:
                                self._push(text, 1 + self.held, step.record)
                                self.held = 0
                            break
                    if not text:
                        host.step_delta(step.record, "", self.clock())
                        self.held += 1  # passed on later, with the text that follows
                    else:
                        chunks = 1 + self.held
                        self.held = 0
                        if self._due(step, text, self._pacing()):
                            # The next step takes over before ``text``, or the current one
                            # goes on with it; either way what follows keeps pace.
                            async with aclosing(self._boundary(step, text, chunks)) as events:
                                async for event in events:
                                    yield event
                        else:
                            self._push(text, chunks, step.record)
                        for event in self._release():
                            yield event
                for event in host.drain():
                    yield event
        except ProviderError as exc:
            step = self.cur
            await self._stop_reading()
            await step.stream.aclose()
            host.close_step(step.record, "failed", None, exc)
            for event in self._flush():  # the answer's own text, read before the failure
                yield event
            if self.answer:
                raise AggregatorError(
                    f"aggregator {self.agent.name} failed at step {step.number + 1} of its "
                    f"answer: {exc}",
                    partial_text="".join(self.answer),
                    errors={self.agent.name: exc},
                ) from exc
            self.error = exc
            return
        except BaseException as exc:
            step = self.cur
            await self._stop_reading()
            await step.stream.aclose()
            host.close_step(step.record, "cancelled", None, exc)
            raise
        step = self.cur
        finish_reason = step.stream.finish_reason
        for event in self._flush():
            yield event
        if not self.gate.looping:
            rest = self.markup.feed(step.joiner.flush()) + self.markup.flush()
            if rest:
                rest = self.gate.feed(rest, self._last_char(), self._answer_text)
            rest += self.gate.flush(lambda: self._answer_text() + rest)
            if rest:
                yield self._emit(step.record, rest)
        if self.gate.parroted:
            _log.info(
                "staircase.prompt_text_dropped", agent=self.agent.name, sentences=self.gate.parroted
            )
        if self.gate.looping:
            finish_reason = "stop"  # the answer ends at the loop
            _log.info(
                "staircase.answer_looping",
                agent=self.agent.name,
                step=step.number,
                restarts=self.gate.restarts,
                repeats=self.gate.repeats,
            )
        # An early start broke when its answer looped, or when nothing but what the filters
        # dropped (prompt text, markup) was left of it; a dropped sentence or tag in an answer
        # that goes on leaves it whole.
        dropped = self.gate.parroted or self.markup_dropped + self.markup.dropped
        broke = [
            reason
            for reason, seen in (
                ("loop", self.gate.looping),
                ("nothing but prompt text", dropped and not self._answer_text().strip()),
            )
            if seen and self.early
        ]
        if broke:
            early_start_broke(self.agent, step.number, broke)
        elif self.early:
            EARLY_START.clear(self.agent)
        await step.stream.aclose()
        host.close_step(step.record, "complete", finish_reason, None)
        if "nothing but prompt text" in broke:
            # All it wrote was dropped: nothing reached the caller, so the answer starts
            # again, late, on finished drafts (once).
            _log.info("staircase.started_again", agent=self.agent.name, reasons=broke)
            again = _Driver(self.stairs, self.agent, late=True)
            again.usage = self.usage + (step.stream.usage or Usage(estimated=True))
            async with aclosing(again.run()) as events:
                async for event in events:
                    yield event
            self.done, self.error = again.done, again.error
            return
        self.done = True
        yield AggregatorDone(
            self.agent.name,
            finish_reason,
            self.usage + (step.stream.usage or Usage(estimated=True)),
            None if self.first_token_at is None else self.first_token_at - self.asked_at,
            self.clock() - self.t0,
        )

    def _last_char(self) -> str:
        if self.ahead:
            return self.ahead[-1][0][-1:]
        return self.answer[-1][-1:] if self.answer else ""

    def _answer_text(self) -> str:
        """The answer as the next step continues it: what the caller has and the read-ahead."""
        text = "".join(self.answer)
        if self.ahead:
            text += self._ahead_text()
        return text

    def _ahead_text(self) -> str:
        return "".join(piece for piece, _, _ in self.ahead)

    def _written(self) -> int:
        """Content chunks of the answer written so far, the read-ahead's included."""
        return self.chunks + self.ahead_chunks

    def _pause_end(self) -> float:
        """Where a wait must end: ``max_pause`` after the caller's last chunk (or from now,
        before the first), so that no gap in the caller's stream is longer."""
        last = self.last_at if self.last_at is not None else self.clock()
        return last + self.staircase.max_pause

    def _step_event(self, number: int, refs: Sequence[RefView], final: bool) -> AggregatorStep:
        answer_chars = sum(map(len, self.answer)) + len(self._ahead_text())
        return self.plan.step_event(number, refs, final, answer_chars, self.clock() - self.t0)

    def _due(self, step: _Step, text: str, waits: bool) -> bool:
        """Whether a boundary comes before ``text``: the step wrote its budget, or the answer
        waits for the references anyway, or they have all ended since this step was asked
        (its last step is due at once: what is left of the answer is written from them). The
        next step continues after the read-ahead, which the caller is given while it gets
        ready: unless the answer waits anyway, a boundary needs enough of it (:meth:`_cover`).
        ``waits``: the pacing holds ``text``."""

        if step.final or not self.plan.stepping:
            return False
        if step.written < step.budget and not waits and self.host.running_chunks():
            return False
        if not waits and self.ahead_chunks < self._cover():
            return False  # too little read ahead to space out while the step gets ready
        tail = "".join(self.answer[-64:])
        if self.ahead:
            tail += self._ahead_text()
        return cut_point(tail, text)

    def _cover(self) -> int:
        """The read-ahead a boundary needs so that, spaced out while the next step gets
        ready, the caller's chunks come at most :data:`COVER_GAP` apart; at most
        :data:`MAX_COVER` chunks (or the whole read-ahead)."""
        if not self.read_ahead:
            return 0
        # n chunks spaced out and then the step's first: n + 1 gaps
        needed = math.ceil(self._ready_bound() / COVER_GAP) - 1
        return max(0, min(self.read_ahead, MAX_COVER, needed))

    # -- pacing (see :class:`Pacer`) --------------------------------------------------------
    def _pacing(self) -> bool:
        """Whether the next chunk the stream writes must wait for a reference (never once no
        later step will read what the references add: there is nothing to wait for)."""
        return self.plan.stepping and not self.given_up and self.pacer.holds(self._written())

    async def _pace(self) -> AsyncGenerator[Event, None]:
        """Wait while :meth:`_pacing`, the caller getting the read-ahead in its turn
        meanwhile, at most until ``max_pause`` after the caller's last chunk (a reference
        waited for that long in vain is left behind)."""
        host = self.host
        self._check_give_up()
        while self._pacing():
            for delta in self._release():
                yield delta
            now = self.clock()
            until = (self.last_at if self.last_at is not None else now) + self.staircase.max_pause
            if self.give_up_at is not None:
                until = min(until, self.give_up_at)
            if now >= until:
                self.pacer.leave_behind(self._written())
                break
            if self.ahead:
                until = min(until, self._turn(now) or now)
            for event in await host.wait(until):
                yield event
            self._check_give_up()

    def _check_give_up(self) -> None:
        if not self.given_up and self.give_up_at is not None and self.clock() >= self.give_up_at:
            self.given_up = True
            self.host.give_up()

    # -- a step boundary ----------------------------------------------------------------------
    async def _boundary(self, step: _Step, text: str, chunks: int) -> AsyncGenerator[Event, None]:
        """``text`` (``chunks`` of the current step's) is not the answer's yet: the next step
        takes over before it, or the current one goes on with it."""
        host = self.host
        pause_until = self._pause_end()
        self._check_give_up()
        for event in host.drain():
            yield event
        refs = host.references()
        plan = self.plan
        if not plan.wanted(refs, self.given_up):
            step.budget = step.written + next(plan.sizes)
            self._push(text, chunks, step.record)
            return
        answer = self._answer_text()
        request_messages, extra = plan.propose(refs, answer, self.given_up)
        if plan.too_long(request_messages, self.overrides[1], self._written()):
            plan.withdraw()
            plan.stepping = False
            _log.info("staircase.context_full", agent=self.agent.name, step=step.number + 1)
            self._push(text, chunks, step.record)
            return
        number = step.number + 1
        final = plan.tracker.settled(refs)
        yield self._step_event(number, refs, final)
        plan.asked += 1
        prefill = answer.rstrip() if plan.continuation.method == "prefill" else None
        stream = self.agent.provider.stream(self._request(request_messages, extra))
        record = host.open_step(self.agent, number, request_messages, stream)
        joiner = Joiner()
        joiner.begin(answer, prefill, echoes=plan.continuation.echoes)
        guard = plan.guard(answer)
        trials: list[Trial] = []
        asked = self.clock()
        try:
            if self.ahead:
                async with aclosing(self._overlap(stream, joiner, guard, trials)) as events:
                    async for event in events:
                        yield event
            else:
                within = pause_until - self.clock()
                trials.append(await try_step(stream, joiner, guard, host.drain, within))
        except BaseException as exc:
            await stream.aclose()
            host.close_step(record, "cancelled", None, exc)
            raise
        trial = trials[0]
        ready = min(self.clock() - asked, 2 * self.staircase.max_pause)
        self.ready_dev += (abs(ready - self.step_ready) - self.ready_dev) * 0.5
        self.step_ready += (ready - self.step_ready) * 0.5
        for event in trial.events:
            yield event
        if not trial.late:
            LATE.clear(self.agent)
        if trial.accepted:
            await step.stream.aclose()
            host.close_step(step.record, "cancelled", None, None)
            self.usage = self.usage + (step.stream.usage or Usage(estimated=True))
            plan.accepted(answer)
            size = next(plan.sizes)
            new = _Step(number, stream, record, joiner, size, final, trial.written, trial.ended)
            self.cur = new
            self.markup_dropped += self.markup.dropped
            self.markup = MarkupFilter()  # what the old stream had begun is not the answer
            self.gate.drop()
            self.held = 0
            self._push(guard.held, max(1, trial.written), record)
            return
        await stream.aclose()
        reason = guard.reason or "rejected"
        host.close_step(record, "cancelled", None, Rejected(reason))
        runs = plan.rejected(trial)
        if runs:
            _log.info(
                "staircase.steps_suspended",
                agent=self.agent.name,
                runs=runs,
                reason="steps were not ready within max_pause",
            )
        _log.info("staircase.step_rejected", agent=self.agent.name, step=number, reason=reason)
        yield AggregatorStepRejected(self.agent.name, number, reason, self.clock() - self.t0)
        step.budget = step.written + next(plan.sizes)
        self._push(text, chunks, step.record)

    async def _overlap(
        self,
        stream: ProviderStream,
        joiner: Joiner,
        guard: ContinuationGuard,
        trials: list[Trial],
    ) -> AsyncGenerator[Event, None]:
        """Try the next step (:func:`try_step`, in a task of its own) while the caller is given
        the read-ahead: as pacing allows, and no faster than the answer's recent pace, so that
        it lasts while the step gets ready. The step is late once the read-ahead is out and
        ``max_pause`` has passed since the caller's last chunk. Appends the trial to
        ``trials``."""
        host = self.host
        # What the trial and the waits take in, in the order they took it, passed on from here.
        drained: deque[Event] = deque()

        def drain() -> Sequence[Event]:
            drained.extend(host.drain())
            return ()

        async def wait(until: float) -> None:
            drained.extend(await host.wait(until))

        task = asyncio.ensure_future(try_step(stream, joiner, guard, drain, None))
        waiter: asyncio.Future[None] | None = None
        try:
            while not task.done():
                while drained:
                    yield drained.popleft()
                now = self.clock()
                last = self.last_at if self.last_at is not None else now
                end = last + self.staircase.max_pause
                if not self.ahead:
                    if now >= end:
                        break  # late
                    until = end
                else:
                    turn = self._turn(now)
                    if turn is None:
                        yield self._pop()
                        continue
                    until = turn
                waiter = asyncio.ensure_future(wait(until))
                await asyncio.wait((task, waiter), return_when=asyncio.FIRST_COMPLETED)
                if not waiter.done():
                    waiter.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await waiter
                waiter = None
                self._check_give_up()
        finally:
            if waiter is not None:
                waiter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await waiter
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        while drained:
            yield drained.popleft()
        if task.cancelled():
            guard.reason = "not ready in time"
            trials.append(Trial(False, late=True))
        else:
            trials.append(task.result())


def _all_ended(references: Callable[[], Sequence[RefView]]) -> bool:
    return all(state != "running" for _, _, state, _ in references())


def _quotable(references: Callable[[], Sequence[RefView]]) -> bool:
    """Whether a reference has text the updates layout would quote now, or none will."""
    refs = references()
    return _all_ended(lambda: refs) or any(
        state in ("running", "complete") and stable_length(text, state == "complete")
        for _, _, state, text in refs
    )


def _sentences(references: Callable[[], Sequence[RefView]]) -> bool:
    return not ReferenceTracker.first_sentence_pending(references())
