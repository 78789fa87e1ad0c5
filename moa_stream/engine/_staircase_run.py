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
is ready lasts until the next step's first words
(:meth:`~moa_stream.engine._staircase_readahead.ReadAhead.spacing`). The next step is
asked with the read-ahead in its prefix and tried in a task of its own while the caller is given
it (:meth:`~moa_stream.engine._staircase_boundary.StepBoundary.cross`), so its time to first
token does not stop the stream.

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
from collections.abc import AsyncGenerator, Callable, Sequence
from contextlib import aclosing
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from moa_stream._exceptions import AggregatorError, ProviderError
from moa_stream._types import ChatMessage, Usage
from moa_stream.engine._staircase_boundary import StepBoundary
from moa_stream.engine._staircase_filters import NOTHING_BUT_PROMPT, AnswerFilters
from moa_stream.engine._staircase_readahead import ReadAhead
from moa_stream.engine._staircase_steps import (
    EARLY_START,
    OpenStep,
    Pacer,
    Pacing,
    StepPlan,
    Stragglers,
    early_start_broke,
    step_request,
    wait_until,
)
from moa_stream.engine.aggregate import Steps
from moa_stream.engine.events import AggregatorDone, Event
from moa_stream.engine.staircase import (
    Joiner,
    ReferenceTracker,
    RefView,
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
        return Steps(driver.ahead.asked_at, driver.run(), driver)


class _Driver:
    """One aggregator's staircase (see the module docstring): the run from the wait before the
    first request to the answer's end, the current step's stream read, paced
    (:class:`Pacing`), through the answer's filters (:class:`AnswerFilters`) into the
    read-ahead and the caller's stream (:class:`ReadAhead`), with a boundary now and then
    (:class:`StepBoundary`)."""

    def __init__(self, stairs: StaircaseStrategy, agent: Agent, *, late: bool = False) -> None:
        # The run's side of things, as the strategy holds it for each aggregator's try.
        self.stairs = stairs
        host, staircase = stairs.host, stairs.staircase
        self.host, self.staircase, self.agent = host, staircase, agent
        self.answer, self.clock, self.t0 = stairs.answer, stairs.clock, stairs.t0
        self.overrides = stairs.overrides
        self.plan = StepPlan(staircase, stairs.spec, agent, stairs.messages)
        self.start_late = late or EARLY_START.suspended(agent)
        self.early = False  # the first request had a reference still being written
        self.filters = AnswerFilters(staircase.loop_restarts or 0, self.plan.instructions)
        self.pacer = Pacer(staircase.lead, host.running_chunks)
        self.stragglers = Stragglers(stairs.give_up_at, host.give_up, self.clock)
        self.usage = Usage()  # of the steps closed so far
        self.reading: asyncio.Future[Any] | None = None  # a read of the stream, in a task
        self.done = False
        self.error: ProviderError | None = None
        # Its parts; the read-ahead is the caller's stream, whose clock the others keep.
        self.ahead = ReadAhead(
            self.answer,
            host.step_delta,
            self.pacer,
            self.plan,
            staircase,
            clock=self.clock,
            t0=self.t0,
        )
        self.pacing = Pacing(self.pacer, self.plan, self.stragglers, self.ahead, host.wait)
        self.boundary = StepBoundary(
            host, agent, self.plan, self.ahead, self.stragglers, self.overrides
        )

    async def run(self) -> AsyncGenerator[Event, None]:
        host = self.host
        plan = self.plan
        ahead = self.ahead
        stragglers = self.stragglers
        quotable = partial(_quotable, plan.tracker, host.references)
        if self.start_late or plan.whole or not quotable():
            # The late start waits for every reference to end (or to be given up on); the
            # whole layout, which quotes only whole sentences, waits at most ``max_pause`` for
            # each running reference's first one (a draft cut mid-sentence is what a small
            # model copies and loops on; a few whole sentences are what it can build on); the
            # updates layout waits at most as long for a first reference with text to quote
            # (a policy may fire on a few tokens, fewer than a quote takes).
            give_up_at = stragglers.give_up_at
            if self.start_late:
                done, until = partial(_all_ended, host.references), give_up_at
            elif plan.whole:
                done, until = partial(_sentences, host.references), ahead.pause_end()
            else:
                done, until = quotable, ahead.pause_end()
            if give_up_at is not None:
                until = min(until or give_up_at, give_up_at)
            async for event in wait_until(done, host.wait, self.clock, until):
                yield event
            stragglers.check()
            ahead.asked_at = self.clock()
        refs = host.references()
        request_messages = plan.first(refs)
        final = plan.tracker.settled(refs)
        self.early = not final
        yield plan.step_event(0, refs, final, ahead.answer_chars(), self.clock() - self.t0)
        request = step_request(self.agent, self.overrides, ahead.written(), request_messages, {})
        stream = self.agent.provider.stream(request)
        record = host.open_step(self.agent, 0, request_messages, stream)
        joiner = Joiner()
        joiner.begin("".join(self.answer))
        step = ahead.step = OpenStep(0, stream, record, joiner, next(plan.sizes), final)
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
        boundary = self.boundary
        pacing = self.pacing
        filters = self.filters
        answer_text = ahead.answer_text
        try:
            while True:
                step = ahead.step
                if step.ended:
                    break
                if ahead.pieces and ahead.chunks >= ahead.limit:
                    # The read-ahead is full: its next chunk goes in its turn, then the
                    # stream is read on.
                    while (until := ahead.turn(self.clock())) is not None:
                        for event in await host.wait(until):
                            yield event
                        stragglers.check()
                    yield ahead.pop()
                    continue
                if pacing.holds():
                    async for event in pacing.wait():
                        yield event
                try:
                    if ahead.pieces and ahead.spacing():
                        # The read-ahead goes on in its turn while the stream is read: a stall
                        # of the stream does not stop the caller's.
                        reading = self.reading = asyncio.ensure_future(step.stream.__anext__())
                        while not reading.done():
                            until = ahead.turn(self.clock()) if ahead.pieces else None
                            if ahead.pieces and until is None:
                                yield ahead.pop()
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
                    ahead.chunk_read()
                    text = filters.markup.feed(step.joiner.feed(content))
                    if text:
                        text = filters.gate.feed(text, ahead.last_char(), answer_text)
                        if filters.gate.looping:
                            # The answer ends: with the sentence that made the loop when only
                            # its end showed it (a repeat), before it when its opening did.
                            if text:
                                ahead.push(text, 1 + filters.held, step.record)
                                filters.held = 0
                            break
                    if not text:
                        host.step_delta(step.record, "", self.clock())
                        filters.held += 1  # passed on later, with the text that follows
                    else:
                        chunks = 1 + filters.held
                        filters.held = 0
                        if boundary.due(step, text, pacing.holds()):
                            # The next step takes over before ``text``, or the current one
                            # goes on with it; either way what follows keeps pace.
                            async with aclosing(boundary.cross(step, text, chunks)) as events:
                                async for event in events:
                                    yield event
                            if ahead.step is not step:  # the next step took over
                                self.usage = self.usage + step.usage()
                                filters.taken_over()
                        else:
                            ahead.push(text, chunks, step.record)
                        for event in ahead.release():
                            yield event
                for event in host.drain():
                    yield event
        except ProviderError as exc:
            step = ahead.step
            await self._stop_reading()
            await step.stream.aclose()
            host.close_step(step.record, "failed", None, exc)
            for event in ahead.flush():  # the answer's own text, read before the failure
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
            step = ahead.step
            await self._stop_reading()
            await step.stream.aclose()
            host.close_step(step.record, "cancelled", None, exc)
            raise
        step = ahead.step
        finish_reason = step.stream.finish_reason
        for event in ahead.flush():
            yield event
        if not filters.gate.looping:
            rest = filters.rest(step.joiner, ahead)
            if rest:
                yield ahead.emit(step.record, rest)
        filters.ended(self.agent.name, step.number)
        if filters.gate.looping:
            finish_reason = "stop"  # the answer ends at the loop
        # An early start that broke the answer makes the next runs start late; a clean one
        # clears that count (a late start counts neither way).
        broke = filters.broke(ahead.answer_text) if self.early else []
        if broke:
            early_start_broke(self.agent, step.number, broke)
        elif self.early:
            EARLY_START.clear(self.agent)
        await step.stream.aclose()
        host.close_step(step.record, "complete", finish_reason, None)
        if NOTHING_BUT_PROMPT in broke:
            # All it wrote was dropped: nothing reached the caller, so the answer starts
            # again, late, on finished drafts (once).
            _log.info("staircase.started_again", agent=self.agent.name, reasons=broke)
            again = _Driver(self.stairs, self.agent, late=True)
            again.usage = self.usage + step.usage()
            async with aclosing(again.run()) as events:
                async for event in events:
                    yield event
            self.done, self.error = again.done, again.error
            return
        self.done = True
        first_token_at = ahead.first_token_at
        yield AggregatorDone(
            self.agent.name,
            finish_reason,
            self.usage + step.usage(),
            None if first_token_at is None else first_token_at - ahead.asked_at,
            self.clock() - self.t0,
        )

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


def _all_ended(references: Callable[[], Sequence[RefView]]) -> bool:
    return all(state != "running" for _, _, state, _ in references())


def _quotable(tracker: ReferenceTracker, references: Callable[[], Sequence[RefView]]) -> bool:
    """Whether the first step would quote a reference's text now, or none will have any."""
    refs = references()
    return tracker.has_quote(refs) or all(state != "running" for _, _, state, _ in refs)


def _sentences(references: Callable[[], Sequence[RefView]]) -> bool:
    return not ReferenceTracker.first_sentence_pending(references())
