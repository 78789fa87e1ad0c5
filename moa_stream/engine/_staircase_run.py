"""Driving a staircase aggregator: the I/O around :mod:`moa_stream.engine.staircase`.

The run hands over through a small :class:`StaircaseHost`: the references of the last layer
as they stand, a way to take in what the proposers sent meanwhile (``drain`` without waiting,
``wait`` for more), and the book-keeping of each step's request. The current step's stream is
read here, in the run's own task, so a token reaches the caller in the loop turn it was parsed
in; between two deltas the proposers' queued chunks are drained (no wait, no queue hop for the
answer) so that, at a step boundary, the references are as fresh as they can be. Falling back
to the next aggregator is the shared loop's (:func:`~moa_stream.engine.aggregate.aggregate`);
:class:`StaircaseStrategy` starts each aggregator's try there.

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

**Pacing.** Within ``lead`` chunks of every reference still being written the answer runs
free; further ahead of one, each chunk waits for that reference to write two of its own, so the
answer slows down steadily (rather than stopping) until the reference catches up, and it ends
after the references it follows. A reference that writes nothing for ``max_pause`` while the
answer waits for it is left behind; references that have not started are not waited for.

So the caller never waits longer than ``max_pause`` for the next chunk, every reference a step
took is only counted as given if that step was accepted, and an error of a later step never
reaches the caller: the previous step's answer is still there to finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from moa_stream._exceptions import (
    AggregatorError,
    ContextLengthError,
    ProviderError,
    RequestRejectedError,
)
from moa_stream._types import ChatMessage, ChatRequest, Usage
from moa_stream.engine.aggregate import Steps
from moa_stream.engine.events import (
    AggregatorDelta,
    AggregatorDone,
    AggregatorStep,
    AggregatorStepRejected,
    Event,
)
from moa_stream.engine.prompts import whole_layout
from moa_stream.engine.staircase import (
    Continuation,
    ContinuationGuard,
    Joiner,
    MarkupFilter,
    ReferenceTracker,
    RefView,
    RepetitionGate,
    Staircase,
    StepPrompts,
    cut_point,
    estimated_tokens,
    step_sizes,
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

#: (provider id, provider name, model) of servers that refused an assistant prefill: those
#: continue by appended turns for the life of the provider object (the entry goes with it).
_NO_PREFILL: set[tuple[int, str, str]] = set()


def _prefill_refused(agent: Agent) -> bool:
    return _agent_key(agent) in _NO_PREFILL


def _remember_refusal(agent: Agent) -> bool:
    """Record that ``agent``'s server refuses prefill; ``False`` if it was known."""
    key = _agent_key(agent)
    if key in _NO_PREFILL:
        return False
    _NO_PREFILL.add(key)
    with contextlib.suppress(TypeError):  # not every provider can be weakly referenced
        weakref.finalize(agent.provider, _NO_PREFILL.discard, key)
    return True


class _Backoff:
    """Per (provider id, provider name, model): something a staircase stops doing for a number
    of runs after ``strikes`` bad runs in a row, twice as many runs each time (up to
    :data:`_MAX_BACKOFF`); a good run clears the count. Entries go with their provider."""

    def __init__(self, strikes: int) -> None:
        self.strikes = strikes
        #: key -> (runs left, last back-off, strikes in a row)
        self.entries: dict[tuple[int, str, str], tuple[int, int, int]] = {}

    def suspended(self, agent: Agent) -> bool:
        """Whether this run of ``agent`` is one of the suspended ones (and counts it)."""
        key = _agent_key(agent)
        entry = self.entries.get(key)
        if entry is None or entry[0] <= 0:
            return False
        self.entries[key] = (entry[0] - 1, entry[1], entry[2])
        return True

    def strike(self, agent: Agent) -> int:
        """A bad run; returns the runs now suspended (0: not yet)."""
        key = _agent_key(agent)
        if key not in self.entries:
            with contextlib.suppress(TypeError):  # not every provider can be weakly referenced
                weakref.finalize(agent.provider, self.entries.pop, key, None)
        _, backoff, strikes = self.entries.get(key, (0, 0, 0))
        strikes += 1
        if strikes < self.strikes:
            self.entries[key] = (0, backoff, strikes)
            return 0
        backoff = min(_MAX_BACKOFF, backoff * 2 or 1)
        self.entries[key] = (backoff, backoff, 0)
        return backoff

    def clear(self, agent: Agent) -> None:
        key = _agent_key(agent)
        entry = self.entries.get(key)
        if entry is not None:
            self.entries[key] = (entry[0], 0, 0)


_MAX_BACKOFF = 16
#: Chunks a reference writes for each chunk of an answer more than ``lead`` ahead of it: the
#: answer slows to half the reference's pace, and the reference catches up.
_CATCH_UP = 2
#: Later steps, suspended after two late steps in a row (across runs). A step not ready within
#: ``max_pause`` means the server could not prefill its prompt in time (a busy or slow server,
#: a prefix cache held per slot): asking again at once would only cost the server the same work
#: while it writes the answer.
_LATE = _Backoff(strikes=2)
#: The early start, suspended after an answer started on unfinished drafts loops (see
#: :class:`~moa_stream.engine.staircase.RepetitionGate`): the next runs start once every
#: reference has ended, as the one-shot aggregator of a waiting MoA does. Some models cannot
#: build on a few sentences of each draft (SmolLM2-135M answers them with loops and remarks
#: about the drafts); after the back-off the early start is tried again.
_LOOPING = _Backoff(strikes=1)
#: Restarts (sentences opening like an earlier one) after which an answer is looping.
_LOOP_LIMIT = 2


def _agent_key(agent: Agent) -> tuple[int, str, str]:
    return (id(agent.provider), agent.provider.name, agent.model)


def _refuses_prefill(exc: ProviderError) -> bool:
    if not isinstance(exc, RequestRejectedError) or isinstance(exc, ContextLengthError):
        return False
    text = str(exc).lower()
    return "prefill" in text or "end with a user message" in text


def _continuation_for(staircase: Staircase, agent: Agent) -> Continuation:
    continuation = staircase.for_agent(agent.name)
    if continuation.method == "prefill" and _prefill_refused(agent):
        return Continuation("turns")
    return continuation


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
        driver = _Driver(
            self.host,
            self.spec,
            self.staircase,
            agent,
            self.answer,
            clock=self.clock,
            t0=self.t0,
            give_up_at=self.give_up_at,
            overrides=self.overrides,
        )
        return Steps(driver.asked_at, driver.run(self.messages), driver)


class _Driver:
    """One aggregator's staircase (see the module docstring)."""

    def __init__(
        self,
        host: StaircaseHost,
        spec: MoA,
        staircase: Staircase,
        agent: Agent,
        answer: list[str],
        *,
        clock: Callable[[], float],
        t0: float,
        give_up_at: float | None,
        overrides: tuple[float | None, int | None, tuple[str, ...] | None],
    ) -> None:
        self.host = host
        self.spec = spec
        self.staircase = staircase
        self.agent = agent
        self.answer = answer
        self.clock = clock
        self.t0 = t0
        self.give_up_at = give_up_at
        self.overrides = overrides
        self.continuation = _continuation_for(staircase, agent)
        self.stepping = staircase.max_steps != 0 and not _LATE.suspended(agent)
        self.start_late = _LOOPING.suspended(agent)
        self.gate = RepetitionGate(words=4, limit=_LOOP_LIMIT)
        self.whole = staircase.layout == "whole"
        t = self.templates = whole_layout(spec.templates) if self.whole else spec.templates
        self.tracker = ReferenceTracker(t, spec.max_reference_chars, whole_sentences=self.whole)
        self.sizes = step_sizes(staircase.steps)
        self.instructions = (t.instructions, t.header, t.update_header, t.continue_instruction)
        self.given_up = False
        self.steps_asked = 0
        self.rejects = 0
        self.turn_from = 0  # answer characters the committed turns already hold
        self.usage = Usage()  # of the steps closed so far
        self.first_token_at: float | None = None
        self.chunks = 0  # content chunks of the answer passed on, whichever step wrote them
        self.markup = MarkupFilter()
        self.pass_on: tuple[str, int] = ("", 0)  # the next text to pass on, and its chunks
        self.pause_until: float | None = None  # the end of a boundary's pause
        self.late: set[int] = set()  # references left behind
        self.seen: dict[int, int] = {}  # each reference's chunks at the answer's last chunk
        self.asked_at = clock()
        self.done = False
        self.error: ProviderError | None = None
        self.cur: _Step | None = None

    # -- the caller's stream ----------------------------------------------------------------
    def _emit(self, step: _Step, text: str, chunks: int = 1) -> AggregatorDelta:
        now = self.clock()
        self.chunks += chunks
        self._paced(chunks)
        self.host.step_delta(step.record, text, now)
        if self.first_token_at is None:
            self.first_token_at = now
        self.answer.append(text)
        return AggregatorDelta(text, now - self.t0)

    def _request(self, messages: list[ChatMessage], extra: dict[str, Any]) -> ChatRequest:
        temperature, max_tokens, stop = self.overrides
        request = self.agent.request(
            messages, temperature=temperature, max_tokens=max_tokens, stop=stop
        )
        if request.max_tokens is not None and self.chunks:
            # ``max_tokens`` (the run's or the agent's) bounds the whole answer, as for a
            # single request.
            request = replace(request, max_tokens=max(1, request.max_tokens - self.chunks))
        if extra:
            request = replace(request, extra={**request.extra, **extra})
        # Every step's prompt starts with the previous one's: let explicit caches mark it.
        return replace(request, cache_prefix=True)

    async def run(self, messages: Sequence[ChatMessage]) -> AsyncGenerator[Event, None]:
        host = self.host
        self.prompts = StepPrompts(
            messages, self.continuation, self.templates, self.agent.system_prompt
        )
        if self.start_late:
            async for event in self._references_end():
                yield event
        elif self.whole:
            async for event in self._first_sentences():
                yield event
        refs = host.references()
        block = self.tracker.block(refs) if self.whole else self.tracker.first(refs)
        request_messages = self.prompts.first(block)
        final = self.tracker.settled(refs)
        yield self._step_event(0, refs, final)
        stream = self.agent.provider.stream(self._request(request_messages, {}))
        record = host.open_step(self.agent, 0, request_messages, stream)
        joiner = Joiner()
        joiner.begin("".join(self.answer))
        step = self.cur = _Step(0, stream, record, joiner, next(self.sizes), final)
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
                try:
                    delta = await step.stream.__anext__()
                except StopAsyncIteration:
                    break
                content = delta.content
                if content:
                    step.written += 1
                    text = self.markup.feed(step.joiner.feed(content))
                    if text:
                        text = self.gate.feed(text, self._last_char(), self._answer_text)
                        if self.gate.looping:
                            break
                    if not text:
                        host.step_delta(step.record, "", self.clock())
                    else:
                        pace = self._pacing()
                        self.pass_on = (text, 1)
                        self.pause_until = None
                        if self._due(step, text, pace):
                            # Waiting for the references anyway: the next step gets ready
                            # in that time. Whichever step goes on, what it passes on next
                            # still keeps pace, within the same pause.
                            async for event in self._boundary(step, text):
                                yield event
                        if self._pacing():
                            async for event in self._pace(self.pause_until):
                                yield event
                        piece, chunks = self.pass_on
                        yield self._emit(self.cur, piece, chunks)
                for event in host.drain():
                    yield event
        except ProviderError as exc:
            step = self.cur
            await step.stream.aclose()
            host.close_step(step.record, "failed", None, exc)
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
            await step.stream.aclose()
            host.close_step(step.record, "cancelled", None, exc)
            raise
        step = self.cur
        finish_reason = step.stream.finish_reason
        if not self.gate.looping:
            rest = self.markup.feed(step.joiner.flush()) + self.markup.flush()
            if rest:
                rest = self.gate.feed(rest, self._last_char(), self._answer_text)
            rest += self.gate.flush(lambda: self._answer_text() + rest)
            if rest:
                yield self._emit(step, rest)
        if self.gate.looping:
            finish_reason = "stop"  # the answer ends at the sentence end before the loop
            self._looped(step)
        elif not self.start_late:
            _LOOPING.clear(self.agent)
        await step.stream.aclose()
        host.close_step(step.record, "complete", finish_reason, None)
        self.done = True
        yield AggregatorDone(
            self.agent.name,
            finish_reason,
            self.usage + (step.stream.usage or Usage(estimated=True)),
            None if self.first_token_at is None else self.first_token_at - self.asked_at,
            self.clock() - self.t0,
        )

    def _last_char(self) -> str:
        return self.answer[-1][-1:] if self.answer else ""

    def _answer_text(self) -> str:
        return "".join(self.answer)

    def _looped(self, step: _Step) -> None:
        """The answer repeats itself: it ends here, and the next runs start late."""
        runs = _LOOPING.strike(self.agent)
        _log.info(
            "staircase.answer_looping",
            agent=self.agent.name,
            step=step.number,
            restarts=self.gate.restarts,
            late_start_runs=runs,
        )

    async def _references_end(self) -> AsyncGenerator[Event, None]:
        """The late start: wait until every reference has ended (or is given up on)."""
        while any(state == "running" for _, _, state, _ in self.host.references()):
            if self.give_up_at is not None and self.clock() >= self.give_up_at:
                self._check_give_up()
                break
            for event in await self.host.wait(self.give_up_at):
                yield event
        self.asked_at = self.clock()

    async def _first_sentences(self) -> AsyncGenerator[Event, None]:
        """The ``whole`` layout quotes only whole sentences: the first step waits, at most
        ``max_pause``, for every reference being written to end its first sentence. A draft
        cut mid-sentence is what a small model copies and then loops on ("The sky is blue, a
        fundamental" thirty times); a few whole sentences are what it can build on."""
        until = self.clock() + self.staircase.max_pause
        if self.give_up_at is not None:
            until = min(until, self.give_up_at)
        while self.tracker.first_sentence_pending(self.host.references()):
            if self.clock() >= until:
                break
            for event in await self.host.wait(until):
                yield event
        self.asked_at = self.clock()

    def _step_event(self, number: int, refs: Sequence[RefView], final: bool) -> AggregatorStep:
        return AggregatorStep(
            self.agent.name,
            number,
            str(self.continuation),
            self.tracker.infos(refs),
            sum(map(len, self.answer)),
            final,
            self.clock() - self.t0,
        )

    def _due(self, step: _Step, text: str, pace: bool) -> bool:
        """Whether a boundary comes before ``text``: the step wrote its budget, or the answer
        waits for the references anyway, or they have all ended since this step was asked
        (its last step is due at once: what is left of the answer is written from them)."""
        if step.final or not self.stepping:
            return False
        if step.written < step.budget and not pace and self.host.running_chunks():
            return False
        return cut_point("".join(self.answer[-64:]), text)

    # -- pacing ---------------------------------------------------------------------------------
    def _pacing(self) -> bool:
        """Whether the next chunk must wait for a reference: the answer is more than ``lead``
        chunks ahead of a reference being written and that reference wrote nothing since the
        answer's last chunk (see :meth:`_pace`)."""
        lead = self.staircase.lead
        if lead is None or self.given_up or not self.stepping:
            return False  # no step will read what the references add: nothing to wait for
        behind = self.chunks + 1 - lead
        late = self.late
        seen = self.seen
        for index, chunks in self.host.running_chunks():
            if chunks == 0 or index in late:
                continue  # not started: nothing to keep pace with yet
            if chunks < behind and chunks < seen.get(index, 0) + _CATCH_UP:
                return True
        return False

    def _paced(self, chunks: int) -> None:
        """The answer passed ``chunks`` on: what each reference had written by then (a
        reference it is ahead of owes the catch-up of all but the first of them)."""
        lead = self.staircase.lead
        if lead is None:
            return
        owed = (chunks - 1) * _CATCH_UP
        behind = self.chunks + 1 - lead
        self.seen = {
            index: n + owed if n < behind else n for index, n in self.host.running_chunks()
        }

    async def _pace(self, until: float | None = None) -> AsyncGenerator[Event, None]:
        """Hold the next chunk so that the answer falls back towards a reference being
        written: within ``lead`` chunks of it the answer runs free; further ahead, each chunk
        waits for the reference to write :data:`_CATCH_UP` of its own. The answer then
        streams steadily at a fraction of the pace of the slowest reference until that one
        catches up, and its end comes after theirs: it is written from finished references,
        instead of the answer racing ahead and stopping for seconds at a step.

        A reference that writes nothing for ``max_pause`` while the answer waits for it
        (stalled) is left behind: the answer does not wait for it again; so no chunk waits
        longer than ``max_pause``. References that have not started are not waited for."""
        host = self.host
        if until is None:
            until = self.clock() + self.staircase.max_pause
        if self.give_up_at is not None:
            until = min(until, self.give_up_at)
        while self._pacing():
            if self.clock() >= until:
                behind = self.chunks + 1 - (self.staircase.lead or 0)
                for index, chunks in host.running_chunks():
                    if 0 < chunks < behind and chunks < self.seen.get(index, 0) + _CATCH_UP:
                        self.late.add(index)
                break
            for event in await host.wait(until):
                yield event
            self._check_give_up()

    def _check_give_up(self) -> None:
        if not self.given_up and self.give_up_at is not None and self.clock() >= self.give_up_at:
            self.given_up = True
            self.host.give_up()

    # -- a step boundary ----------------------------------------------------------------------
    async def _boundary(self, step: _Step, text: str) -> AsyncGenerator[Event, None]:
        """``text`` is the current step's next delta, not passed on yet: the next step takes
        over before it, or the current one goes on with it."""
        host = self.host
        sc = self.staircase
        pause_until = self.pause_until = self.clock() + sc.max_pause
        self._check_give_up()
        for event in host.drain():
            yield event
        refs = host.references()
        chars, changed = self.tracker.news(refs, given_up=self.given_up)
        if sc.max_steps is not None and self.steps_asked >= sc.max_steps:
            self.stepping = False
        # The last step allowed is kept for references that all reached their end, so that
        # the answer's conclusion is written from them.
        last_one = sc.max_steps is not None and self.steps_asked + 1 >= sc.max_steps
        settling = self.given_up or all(state != "running" for _, _, state, _ in refs)
        if (
            not self.stepping
            or (not changed and chars < sc.min_news)
            or (last_one and not settling)
        ):
            step.budget = step.written + next(self.sizes)
            return
        answer = "".join(self.answer)
        snapshot = self.tracker.snapshot()
        if self.whole:
            block = self.tracker.block(refs, given_up=self.given_up)
            request_messages, extra = self.prompts.refresh(block, answer)
        else:
            parts = self.tracker.gains(refs, given_up=self.given_up)
            request_messages, extra = self.prompts.propose(parts, answer[self.turn_from :], answer)
        if self._too_long(request_messages):
            self.tracker.restore(snapshot)
            self.stepping = False
            _log.info("staircase.context_full", agent=self.agent.name, step=step.number + 1)
            return
        number = step.number + 1
        final = self.tracker.settled(refs)
        yield self._step_event(number, refs, final)
        self.steps_asked += 1
        prefill = answer.rstrip() if self.continuation.method == "prefill" else None
        stream = self.agent.provider.stream(self._request(request_messages, extra))
        record = host.open_step(self.agent, number, request_messages, stream)
        joiner = Joiner()
        joiner.begin(answer, prefill, echoes=self.continuation.echoes)
        guard = ContinuationGuard(answer, self.instructions, words=sc.guard_words)
        verdict: bool | None = None
        ended = False
        late = False
        written = 0
        error: ProviderError | None = None
        held_events: list[Event] = []
        try:
            async with asyncio.timeout(max(0.0, pause_until - self.clock())):
                await stream.__aenter__()
                while verdict is None:
                    try:
                        delta = await stream.__anext__()
                    except StopAsyncIteration:
                        ended = True
                        rest = joiner.flush()
                        if rest:
                            verdict = guard.feed(rest)
                        if verdict is None:
                            verdict = guard.finish()
                        break
                    if delta.content:
                        written += 1
                        piece = joiner.feed(delta.content)
                        if piece:
                            verdict = guard.feed(piece)
                    held_events.extend(host.drain())
        except TimeoutError:
            verdict = False
            guard.reason = "not ready in time"
            late = True
        except ProviderError as exc:
            verdict = False
            error = exc
            guard.reason = exc.kind
        except BaseException as exc:
            await stream.aclose()
            host.close_step(record, "cancelled", None, exc)
            raise
        for event in held_events:
            yield event
        if verdict is not None and not late:
            _LATE.clear(self.agent)
        if verdict:
            await step.stream.aclose()
            host.close_step(step.record, "cancelled", None, None)
            self.usage = self.usage + (step.stream.usage or Usage(estimated=True))
            self.prompts.commit()
            if self.continuation.method == "turns":
                self.turn_from = len(answer)
            self.rejects = 0
            new = _Step(number, stream, record, joiner, next(self.sizes), final, written, ended)
            self.cur = new
            self.markup = MarkupFilter()  # what the old stream had begun is not the answer
            self.gate.drop()
            self.pass_on = (guard.held, max(1, written))
            return
            return
        await stream.aclose()
        reason = guard.reason or "rejected"
        host.close_step(record, "cancelled", None, _Rejected(reason))
        self.tracker.restore(snapshot)
        self.rejects += 1
        if error is not None and _refuses_prefill(error):
            self._downgrade(error)
        elif isinstance(error, ContextLengthError):
            self.stepping = False
        if late:
            # The server is too slow or busy for steps now: stop for this run (and, after
            # repeated late steps, the next few).
            self.stepping = False
            runs = _LATE.strike(self.agent)
            if runs:
                _log.info(
                    "staircase.steps_suspended",
                    agent=self.agent.name,
                    runs=runs,
                    reason="steps were not ready within max_pause",
                )
        if self.rejects >= sc.max_rejects:
            self.stepping = False
        _log.info("staircase.step_rejected", agent=self.agent.name, step=number, reason=reason)
        yield AggregatorStepRejected(self.agent.name, number, reason, self.clock() - self.t0)
        step.budget = step.written + next(self.sizes)

    def _too_long(self, messages: Sequence[ChatMessage]) -> bool:
        window = self.staircase.context_window
        if window is None:
            return False
        max_tokens = self.overrides[1] or self.agent.max_tokens
        reserve = 256 if max_tokens is None else max(1, max_tokens - self.chunks)
        return estimated_tokens(messages) + reserve > window

    def _downgrade(self, error: ProviderError) -> None:
        """The server refused prefill: appended turns from now on, for this provider's model."""
        self.rejects -= 1  # not the model's fault: the next boundary tries again
        if _remember_refusal(self.agent):
            _log.warning(
                "staircase.prefill_refused",
                agent=self.agent.name,
                provider=self.agent.provider.name,
                model=self.agent.model,
                error=str(error),
                hint="continuing by appended turns; set the provider's continuation to turns",
            )
        self.continuation = Continuation("turns")
        self.prompts.switch(self.continuation)
        self.turn_from = 0


class _Rejected(Exception):
    """Why a step was not passed on (the step's record error)."""

    def __str__(self) -> str:
        return f"rejected: {self.args[0]}"
