"""The staircase's parts around one step: what it remembers of each aggregator between runs,
the pacing of the answer against the references (and the give-up on them) as its stream is
read, the step being read, and the trial of a later step's first words. Used by the
staircase's driver (:mod:`moa_stream.engine._staircase_run`) and the parts it drives."""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import structlog

from moa_stream._exceptions import ContextLengthError, ProviderError, RequestRejectedError
from moa_stream._types import ChatMessage, ChatRequest, Usage
from moa_stream.engine.events import AggregatorStep, Event
from moa_stream.engine.prompts import whole_layout
from moa_stream.engine.staircase import (
    Continuation,
    ContinuationGuard,
    Joiner,
    ReferenceTracker,
    RefView,
    Staircase,
    StepPrompts,
    estimated_tokens,
    step_sizes,
)

if TYPE_CHECKING:
    from moa_stream.engine._staircase_readahead import ReadAhead
    from moa_stream.engine.spec import Agent, MoA
    from moa_stream.providers import ProviderStream

__all__ = [
    "CATCH_UP",
    "LATE",
    "EARLY_START",
    "Backoff",
    "OpenStep",
    "Pacer",
    "Pacing",
    "Rejected",
    "StepPlan",
    "Stragglers",
    "Trial",
    "continuation_for",
    "early_start_broke",
    "step_request",
    "refuses_prefill",
    "remember_refusal",
    "try_step",
]


_log = structlog.get_logger("moa_stream.staircase")

# -- what the staircase remembers of an aggregator between runs ------------------------------

#: (provider id, provider name, model) of servers that refused an assistant prefill: those
#: continue by appended turns for the life of the provider object (the entry goes with it).
NO_PREFILL: set[tuple[int, str, str]] = set()


def prefill_refused(agent: Agent) -> bool:
    return agent_key(agent) in NO_PREFILL


def remember_refusal(agent: Agent) -> bool:
    """Record that ``agent``'s server refuses prefill; ``False`` if it was known."""
    key = agent_key(agent)
    if key in NO_PREFILL:
        return False
    NO_PREFILL.add(key)
    with contextlib.suppress(TypeError):  # not every provider can be weakly referenced
        weakref.finalize(agent.provider, NO_PREFILL.discard, key)
    return True


class Backoff:
    """Per (provider id, provider name, model): something a staircase stops doing for a number
    of runs after ``strikes`` bad runs in a row, twice as many runs each time (up to
    :data:`MAX_BACKOFF`); a good run clears the count. Entries go with their provider."""

    def __init__(self, strikes: int) -> None:
        self.strikes = strikes
        #: key -> (runs left, last back-off, strikes in a row)
        self.entries: dict[tuple[int, str, str], tuple[int, int, int]] = {}

    def suspended(self, agent: Agent) -> bool:
        """Whether this run of ``agent`` is one of the suspended ones (and counts it)."""
        key = agent_key(agent)
        entry = self.entries.get(key)
        if entry is None or entry[0] <= 0:
            return False
        self.entries[key] = (entry[0] - 1, entry[1], entry[2])
        return True

    def strike(self, agent: Agent) -> int:
        """A bad run; returns the runs now suspended (0: not yet)."""
        key = agent_key(agent)
        if key not in self.entries:
            with contextlib.suppress(TypeError):  # not every provider can be weakly referenced
                weakref.finalize(agent.provider, self.entries.pop, key, None)
        _, backoff, strikes = self.entries.get(key, (0, 0, 0))
        strikes += 1
        if strikes < self.strikes:
            self.entries[key] = (0, backoff, strikes)
            return 0
        backoff = min(MAX_BACKOFF, backoff * 2 or 1)
        self.entries[key] = (backoff, backoff, 0)
        return backoff

    def clear(self, agent: Agent) -> None:
        key = agent_key(agent)
        entry = self.entries.get(key)
        if entry is not None:
            self.entries[key] = (entry[0], 0, 0)


MAX_BACKOFF = 16
#: Chunks a reference writes for each chunk of an answer more than ``lead`` ahead of it: the
#: answer slows to half the reference's pace, and the reference catches up.
CATCH_UP = 2
#: Later steps, suspended after two late steps in a row (across runs). A step not ready within
#: ``max_pause`` means the server could not prefill its prompt in time (a busy or slow server,
#: a prefix cache held per slot): asking again at once would only cost the server the same work
#: while it writes the answer.
LATE = Backoff(strikes=2)
#: The early start, suspended after an answer started on unfinished drafts broke (it looped,
#: see :class:`~moa_stream.engine.staircase.RepetitionGate`, or was nothing but the prompt's
#: sentences or markup, which the staircase dropped): the next runs start once every reference
#: has ended, as the one-shot aggregator of a waiting MoA does, and after the back-off the early
#: start is tried again. Some models cannot build on a few sentences of each draft
#: (SmolLM2-135M answers them with loops, "A note marked partial is incomplete", stray tags);
#: a run that started late neither counts against the early start nor for it.
EARLY_START = Backoff(strikes=1)


def agent_key(agent: Agent) -> tuple[int, str, str]:
    return (id(agent.provider), agent.provider.name, agent.model)


def refuses_prefill(exc: ProviderError) -> bool:
    if not isinstance(exc, RequestRejectedError) or isinstance(exc, ContextLengthError):
        return False
    text = str(exc).lower()
    return "prefill" in text or "end with a user message" in text


def continuation_for(staircase: Staircase, agent: Agent) -> Continuation:
    continuation = staircase.for_agent(agent.name)
    if continuation.method == "prefill" and prefill_refused(agent):
        return Continuation("turns")
    return continuation


# -- pacing ---------------------------------------------------------------------------------


class Pacer:
    """Keeps the answer within ``lead`` chunks of every reference still being written: further
    ahead of one, each chunk waits for that reference to write :data:`CATCH_UP` of its own. The
    answer then streams steadily at a fraction of the pace of the slowest reference until that
    one catches up, and its end comes after theirs: it is written from finished references,
    instead of the answer racing ahead and stopping for seconds at a step.

    A reference that writes nothing for ``max_pause`` while the answer waits for it (stalled)
    is left behind (:meth:`leave_behind`): the answer does not wait for it again. References
    that have not started are not waited for."""

    __slots__ = ("_running", "late", "lead", "seen")

    def __init__(self, lead: int | None, running: Callable[[], list[tuple[int, int]]]) -> None:
        self.lead = lead
        self._running = running  # (index, content chunks so far) of each reference running
        self.late: set[int] = set()  # references left behind
        self.seen: dict[int, int] = {}  # each reference's chunks at the answer's last chunk

    def holds(self, chunks: int) -> bool:
        """Whether the answer's next chunk (``chunks`` passed on so far) must wait: it is more
        than ``lead`` chunks ahead of a reference being written that wrote nothing since."""
        if self.lead is None:
            return False
        behind = chunks + 1 - self.lead
        late = self.late
        seen = self.seen
        for index, n in self._running():
            if n == 0 or index in late:
                continue  # not started: nothing to keep pace with yet
            if n < behind and n < seen.get(index, 0) + CATCH_UP:
                return True
        return False

    def passed(self, chunks: int, n: int) -> None:
        """The answer passed ``n`` chunks on (``chunks`` in all, those included): what each
        reference had written by then (one it is ahead of owes the catch-up of all but the
        first of them)."""
        if self.lead is None:
            return
        owed = (n - 1) * CATCH_UP
        behind = chunks + 1 - self.lead
        self.seen = {index: k + owed if k < behind else k for index, k in self._running()}

    def leave_behind(self, chunks: int) -> None:
        """The answer waited ``max_pause`` in vain: the references it waited for are late."""
        behind = chunks + 1 - (self.lead or 0)
        for index, n in self._running():
            if 0 < n < behind and n < self.seen.get(index, 0) + CATCH_UP:
                self.late.add(index)


class Stragglers:
    """``give_up_after``: once the run's clock reaches ``give_up_at``, the first :meth:`check`
    gives up on the references still running (``give_up``: the layer's stragglers policy);
    from then on the answer is not paced against them and the steps take them as settled."""

    __slots__ = ("clock", "give_up", "give_up_at", "given_up")

    def __init__(
        self, give_up_at: float | None, give_up: Callable[[], None], clock: Callable[[], float]
    ) -> None:
        self.give_up_at = give_up_at
        self.give_up = give_up
        self.clock = clock
        self.given_up = False

    def check(self) -> None:
        if not self.given_up and self.give_up_at is not None and self.clock() >= self.give_up_at:
            self.given_up = True
            self.give_up()


class Pacing:
    """The pacing of the stream being read (see :class:`Pacer`): whether its next chunk must
    wait for a reference (:meth:`holds`), and that wait (:meth:`wait`), during which the caller
    gets the read-ahead (``ahead``) in its turn, on its clock."""

    __slots__ = ("ahead", "clock", "host_wait", "max_pause", "pacer", "plan", "stragglers")

    def __init__(
        self,
        pacer: Pacer,
        plan: StepPlan,
        stragglers: Stragglers,
        ahead: ReadAhead,
        host_wait: Callable[[float | None], Awaitable[Sequence[Event]]],
    ) -> None:
        self.pacer, self.plan, self.stragglers = pacer, plan, stragglers
        self.ahead = ahead
        self.clock, self.max_pause = ahead.clock, ahead.max_pause
        self.host_wait = host_wait  # the run's wait for the proposers

    def holds(self) -> bool:
        """Whether the next chunk the stream writes must wait for a reference (never once no
        later step will read what the references add: there is nothing to wait for)."""
        return (
            self.plan.stepping
            and not self.stragglers.given_up
            and self.pacer.holds(self.ahead.written())
        )

    async def wait(self) -> AsyncGenerator[Event, None]:
        """Wait while :meth:`holds`, the caller getting the read-ahead in its turn meanwhile,
        at most until ``max_pause`` after the caller's last chunk (a reference waited for that
        long in vain is left behind)."""
        ahead = self.ahead
        stragglers = self.stragglers
        stragglers.check()
        while self.holds():
            for delta in ahead.release():
                yield delta
            now = self.clock()
            until = (ahead.last_at if ahead.last_at is not None else now) + self.max_pause
            if stragglers.give_up_at is not None:
                until = min(until, stragglers.give_up_at)
            if now >= until:
                self.pacer.leave_behind(ahead.written())
                break
            if ahead.pieces:
                until = min(until, ahead.turn(now) or now)
            for event in await self.host_wait(until):
                yield event
            stragglers.check()


# -- the step being read ---------------------------------------------------------------------


@dataclass(slots=True)
class OpenStep:
    """The step whose stream the caller is reading: its ``number``, ``stream`` and the run's
    ``record`` of it, the ``joiner`` its text goes through, its ``budget`` of content chunks
    before a boundary, whether it is the ``final`` one, the content chunks it has ``written``
    so far, and whether its stream ``ended``."""

    number: int
    stream: ProviderStream
    record: Any
    joiner: Joiner
    budget: int
    final: bool
    written: int = 0
    ended: bool = False

    def usage(self) -> Usage:
        """The step's usage, as its stream counted it (or estimated, when it did not)."""
        return self.stream.usage or Usage(estimated=True)


# -- a later step's first words --------------------------------------------------------------


@dataclass(slots=True)
class Trial:
    """How a later step's first words went: ``accepted`` or not (``guard.reason`` says why),
    ``late`` (not ready in time), the provider ``error`` if any, the content chunks it wrote,
    whether its stream already ``ended``, and the proposers' events taken in meanwhile."""

    accepted: bool
    late: bool = False
    error: ProviderError | None = None
    written: int = 0
    ended: bool = False
    events: list[Event] = field(default_factory=list)


async def try_step(
    stream: ProviderStream,
    joiner: Joiner,
    guard: ContinuationGuard,
    drain: Callable[[], Sequence[Event]],
    within: float | None,
) -> Trial:
    """Open ``stream`` and hold its first words in ``guard`` until it decides, ``within``
    seconds at most (``None``: the caller bounds it). Cancellation propagates (the caller
    closes the stream)."""
    trial = Trial(False)
    verdict: bool | None = None
    try:
        async with asyncio.timeout(None if within is None else max(0.0, within)):
            await stream.__aenter__()
            while verdict is None:
                try:
                    delta = await stream.__anext__()
                except StopAsyncIteration:
                    trial.ended = True
                    rest = joiner.flush()
                    if rest:
                        verdict = guard.feed(rest)
                    if verdict is None:
                        verdict = guard.finish()
                    break
                if delta.content:
                    trial.written += 1
                    piece = joiner.feed(delta.content)
                    if piece:
                        verdict = guard.feed(piece)
                trial.events.extend(drain())
    except TimeoutError:
        verdict = False
        guard.reason = "not ready in time"
        trial.late = True
    except ProviderError as exc:
        verdict = False
        trial.error = exc
        guard.reason = exc.kind
    trial.accepted = bool(verdict)
    return trial


# -- what each step asks -------------------------------------------------------------------------


class StepPlan:
    """One aggregator's steps: how it continues, what each step's request holds of the
    references, the step sizes, and whether it may still step (``stepping``): the limits of
    :class:`~moa_stream.engine.staircase.Staircase` (``max_steps``, ``min_news``,
    ``max_rejects``), late steps and a refused prefill. No I/O."""

    def __init__(
        self,
        staircase: Staircase,
        spec: MoA,
        agent: Agent,
        messages: Sequence[ChatMessage],
    ) -> None:
        self.staircase = staircase
        self.agent = agent
        self.continuation = continuation_for(staircase, agent)
        self.stepping = staircase.max_steps != 0 and not LATE.suspended(agent)
        self.whole = staircase.layout == "whole"
        t = whole_layout(spec.templates) if self.whole else spec.templates
        self.tracker = ReferenceTracker(t, spec.max_reference_chars, whole_sentences=self.whole)
        self.prompts = StepPrompts(messages, self.continuation, t, agent.system_prompt)
        self.sizes = step_sizes(staircase.steps)
        self.instructions = t.prose()
        self.asked = 0  # later steps asked
        self.rejects = 0  # rejected in a row
        self.turn_from = 0  # answer characters the committed turns already hold
        self._snapshot: dict[int, tuple[int, int, str]] = {}

    def first(self, refs: Sequence[RefView]) -> list[ChatMessage]:
        block = self.tracker.block(refs) if self.whole else self.tracker.first(refs)
        return self.prompts.first(block)

    def wanted(self, refs: Sequence[RefView], given_up: bool) -> bool:
        """Whether a boundary now asks a later step: stepping is on, the references gained
        ``min_news`` characters or changed state, and the last step allowed is kept for
        references that all reached their end (the answer's conclusion is written from them)."""
        sc = self.staircase
        chars, changed = self.tracker.news(refs, given_up=given_up)
        if sc.max_steps is not None and self.asked >= sc.max_steps:
            self.stepping = False
        last_one = sc.max_steps is not None and self.asked + 1 >= sc.max_steps
        settling = given_up or all(state != "running" for _, _, state, _ in refs)
        return (
            self.stepping and (changed or chars >= sc.min_news) and not (last_one and not settling)
        )

    def propose(
        self, refs: Sequence[RefView], answer: str, given_up: bool
    ) -> tuple[list[ChatMessage], dict[str, Any]]:
        """The next step's request (taken by :meth:`accepted`, undone by :meth:`withdraw`)."""
        self._snapshot = self.tracker.snapshot()
        if self.whole:
            block = self.tracker.block(refs, given_up=given_up)
            return self.prompts.refresh(block, answer)
        parts = self.tracker.gains(refs, given_up=given_up)
        return self.prompts.propose(parts, answer[self.turn_from :], answer)

    def withdraw(self) -> None:
        """The proposed step is not sent, or was rejected: what it took is not given."""
        self.tracker.restore(self._snapshot)

    def too_long(
        self, messages: Sequence[ChatMessage], max_tokens: int | None, written: int
    ) -> bool:
        """Whether ``messages`` would not fit the context window with room for the rest of the
        answer (``max_tokens``, the run's or else the agent's, less the ``written`` chunks)."""
        window = self.staircase.context_window
        if window is None:
            return False
        max_tokens = max_tokens or self.agent.max_tokens
        reserve = 256 if max_tokens is None else max(1, max_tokens - written)
        return estimated_tokens(messages) + reserve > window

    def step_event(
        self, number: int, refs: Sequence[RefView], final: bool, answer_chars: int, t: float
    ) -> AggregatorStep:
        return AggregatorStep(
            self.agent.name,
            number,
            str(self.continuation),
            self.tracker.infos(refs),
            answer_chars,
            final,
            t,
        )

    def guard(self, answer: str) -> ContinuationGuard:
        return ContinuationGuard(answer, self.instructions, words=self.staircase.guard_words)

    def accepted(self, answer: str) -> None:
        self.prompts.commit()
        if self.continuation.method == "turns":
            self.turn_from = len(answer)
        self.rejects = 0

    def rejected(self, trial: Trial) -> int:
        """A later step was rejected; returns the runs for which later steps are now suspended
        (late steps), 0 if none."""
        self.withdraw()
        self.rejects += 1
        error = trial.error
        runs = 0
        if error is not None and refuses_prefill(error):
            self.downgrade(error)
        elif isinstance(error, ContextLengthError):
            self.stepping = False
        if trial.late:
            # The server is too slow or busy for steps now: stop for this run (and, after
            # repeated late steps, the next few).
            self.stepping = False
            runs = LATE.strike(self.agent)
        if self.rejects >= self.staircase.max_rejects:
            self.stepping = False
        return runs

    def downgrade(self, error: ProviderError) -> None:
        """The server refused prefill: appended turns from now on, for this provider's model."""
        self.rejects -= 1  # not the model's fault: the next boundary tries again
        if remember_refusal(self.agent):
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


def step_request(
    agent: Agent,
    overrides: tuple[float | None, int | None, tuple[str, ...] | None],
    written: int,
    messages: list[ChatMessage],
    extra: dict[str, Any],
) -> ChatRequest:
    """A step's request: the run's ``overrides`` (temperature, max_tokens, stop), with
    ``max_tokens`` bounding the whole answer as for a single request (less the ``written``
    chunks), and ``cache_prefix`` on: every step's prompt starts with the previous one's."""
    temperature, max_tokens, stop = overrides
    request = agent.request(messages, temperature=temperature, max_tokens=max_tokens, stop=stop)
    if request.max_tokens is not None and written:
        request = replace(request, max_tokens=max(1, request.max_tokens - written))
    if extra:
        request = replace(request, extra={**request.extra, **extra})
    return replace(request, cache_prefix=True)


def early_start_broke(agent: Agent, step: int, reasons: Sequence[str]) -> None:
    """An answer started on unfinished drafts broke (``reasons``: ``loop``, ``nothing but
    prompt text``) by step ``step``: the next runs of ``agent`` start late."""
    runs = EARLY_START.strike(agent)
    _log.info(
        "staircase.early_start_broke",
        agent=agent.name,
        step=step,
        reasons=list(reasons),
        late_start_runs=runs,
    )


async def wait_until(
    done: Callable[[], bool],
    wait: Callable[[float | None], Awaitable[Sequence[Event]]],
    clock: Callable[[], float],
    until: float | None,
) -> AsyncGenerator[Event, None]:
    """The proposers' events until ``done()`` or ``until`` (``None``: no bound)."""
    while not done():
        if until is not None and clock() >= until:
            return
        for event in await wait(until):
            yield event


class Rejected(Exception):
    """Why a step was not passed on (the step's record error)."""

    def __str__(self) -> str:
        return f"rejected: {self.args[0]}"
