"""Running a MoA: proposer fan-out, policy decisions, the streamed aggregator.

Design, in brief:

- The run owns every task it starts (one per proposer request, plus the aggregator pre-warm)
  in a plain set, cancelled and awaited
  in :meth:`MoARun.aclose`. No task group is held open across a ``yield``: the event generator
  only reads.
- Each request has one record, a :class:`~moa_stream.engine.layer.Call`. A proposer's task
  appends what it reads to its call's ``pending`` list and puts the *call* (not the chunk)
  into one ``asyncio.Queue``, once until the run has taken it in: the single fan-in, one queue
  operation per wake-up rather than per chunk. The consumer's own task takes from the queue,
  drains everything already queued, feeds it all to the pure
  :class:`~moa_stream.engine.layer.LayerState`, and only then asks the policy: a proposer's
  last chunk and its end, read in the same loop turn, are decided on together.
- A proposer is done at its finish chunk: its task reads the stream's tail (usage, ``[DONE]``)
  on its own while the run goes on.
- The aggregator's request is sent from the consumer's task, in the same loop turn as the
  decision and before ``layer.done`` is handed to the caller, so neither a task hop nor the
  caller's handling of ``layer.done`` costs TTFT. Its stream is then read in the same task: a
  token is handed to the caller in the same loop turn it was parsed in.
- Deadlines are one ``loop.call_at`` timer per layer that puts ``None`` (a tick) in the queue.
- A staircase aggregator (``MoA.staircase``) is driven by
  :mod:`moa_stream.engine._staircase_run` through :class:`_StaircaseHost`: its steps are read
  in the consumer's task too, and between two of its deltas the queue is drained without
  waiting, so every step boundary sees the proposers' latest text.
- Leaving before ``run.done`` (``break``, an exception, a cancelled caller, ``aclose()`` from
  another task) cancels every request at once. Only proposers of ``keep`` layers still running
  after ``run.done`` get ``keep_grace`` seconds to finish, for their accounting.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Self

import structlog

from moa_stream._exceptions import AggregatorError, LayerFailedError, ProviderError
from moa_stream._resource import AsyncResource
from moa_stream._types import ChatMessage, ChatRequest, Usage
from moa_stream.engine._staircase_run import run_staircase
from moa_stream.engine.events import (
    AgentReport,
    AggregatorDelta,
    AggregatorDone,
    AggregatorFailed,
    AggregatorStarted,
    Event,
    Hedged,
    LayerDone,
    LayerReport,
    ProposerDelta,
    ProposerDone,
    ProposerFailed,
    ProposerStarted,
    ReferenceInfo,
    RunDone,
    RunReport,
)
from moa_stream.engine.layer import Call, Decision, LayerState, Reference
from moa_stream.engine.policies import WaitAll
from moa_stream.engine.prompts import build_reference_messages, with_system_prompt
from moa_stream.engine.similarity import agreement as mean_agreement
from moa_stream.engine.streams import open_stream

if TYPE_CHECKING:
    from moa_stream.engine.spec import Agent, MoA
    from moa_stream.engine.staircase import RefView
    from moa_stream.providers import ProviderStream

__all__ = ["MoARun", "RunResult"]

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class RunResult:
    """What :meth:`MoARun.final` returns: the whole answer and the report."""

    text: str
    report: RunReport


def _prompt_chars(messages: Sequence[ChatMessage]) -> int:
    return sum(len(m["content"]) for m in messages)


def _error_kind(exc: BaseException | None) -> str:
    return exc.kind if isinstance(exc, ProviderError) else "internal"


class MoARun(AsyncResource):
    """One run of a :class:`~moa_stream.engine.spec.MoA`; create it with ``moa.stream(...)``.

    Use it as an async context manager. Inside, consume exactly one of :meth:`events` (every
    typed event), :meth:`text` (the answer's text pieces as they arrive) or :meth:`final`
    (everything at once). Leaving the block before ``run.done``, at any point, cancels every
    upstream request the run still has open and waits until they are closed. ``aclose()`` may
    also be called from another task (a stop button): the consumer's iteration then ends
    without ``run.done``.
    """

    def __init__(
        self,
        spec: MoA,
        messages: list[ChatMessage],
        *,
        temperature: float | None,
        max_tokens: int | None,
        stop: tuple[str, ...] | None,
        clock: Callable[[], float],
        keep_grace: float = 30.0,
    ) -> None:
        if not messages:
            raise ValueError("a run needs at least one message")
        self.spec = spec
        self.messages = messages
        self._overrides = (temperature, max_tokens, stop)
        self._clock = clock
        self._keep_grace = keep_grace
        self._inbox: asyncio.Queue[Call | None] = asyncio.Queue()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._calls: list[Call] = []
        self._states: list[LayerState] = []
        self._layer_reports: list[LayerReport] = []
        self._pending: list[Event] = []
        self._timer: asyncio.TimerHandle | None = None
        self._gen: AsyncGenerator[Event, None] | None = None
        self._consumer: asyncio.Task[Any] | None = None
        self._gen_exited = asyncio.Event()
        self._stop_requested = False
        self._consumed = False
        self._entered = False
        self._finished = False  # run.done was handed to the caller
        self._closed = False  # aclose() completed its clean-up
        self._t0 = 0.0
        self._answer: list[str] = []
        self._first_token_at: float | None = None
        self._aggregator: Call | None = None
        self._finish_reason: str | None = None
        self._error: BaseException | None = None
        self._ended_at: float | None = None
        self._report: RunReport | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        self._entered = True
        self._start()
        return self

    def _start(self) -> None:
        if self._gen is not None:
            return
        if self._closed:
            raise RuntimeError("this run is closed")
        self._t0 = self._clock()
        spec = self.spec
        if spec.layers:
            self._pending.extend(self._start_layer(0, None))
            if spec.prewarm and not self._pool_warm_at_decision():
                self._spawn(self._prewarm(spec.aggregator))
        self._gen = self._drive()

    async def aclose(self) -> None:
        """Stop the run and wait until every request is closed. Idempotent.

        Before ``run.done`` everything still running is cancelled at once. After it, proposers
        of ``keep`` layers (and the last bytes of finished proposers: usage, ``[DONE]``) get
        ``keep_grace`` seconds to finish, for the report's accounting; cancelling the caller
        during that wait cancels them at once (and a second ``aclose()`` finishes the
        clean-up).
        """
        if self._closed:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        gen = self._gen
        if gen is not None and not self._gen_exited.is_set():
            consumer = self._consumer
            running = getattr(gen, "ag_running", False)  # not in the AsyncGenerator ABC
            if running and consumer is not None and consumer is not asyncio.current_task():
                # The generator is awaiting in the consumer's task: interrupt that await the way
                # asyncio.timeout() does; _drive recognises the request and ends quietly.
                if not self._stop_requested:
                    self._stop_requested = True
                    consumer.cancel()
                await self._gen_exited.wait()
            else:
                with contextlib.suppress(RuntimeError):  # being closed by another aclose()
                    await gen.aclose()
        try:
            if self._finished and self._keep_grace > 0:
                kept = [t for t in self._tasks if not t.done()]
                if kept:
                    # "keep" stragglers finish for accounting; the answer is out, so this
                    # waits for nobody but the caller's clean-up.
                    await asyncio.wait(kept, timeout=self._keep_grace)
        finally:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self._closed = True
        self._report = None  # rebuilt with the final accounting on next access

    # -- consuming ---------------------------------------------------------------------------
    def events(self) -> AsyncIterator[Event]:
        """Every event of the run, in order, ending with ``run.done``. Consume once."""
        if not self._entered:
            # Outside `async with` nothing would close the run's requests if the caller left
            # early: stragglers and their connections would outlive the loop.
            raise RuntimeError(
                "consume a run inside `async with spec.stream(messages) as run:`, "
                "or call `await run.final()`, which closes it"
            )
        self._start()
        if self._consumed:
            raise RuntimeError("a run's events can be consumed only once")
        self._consumed = True
        assert self._gen is not None
        return self._gen

    async def text(self) -> AsyncIterator[str]:
        """The answer's content, each piece yielded the moment it arrived."""
        async for event in self.events():
            if event.type == "aggregator.delta":
                yield event.text

    async def final(self) -> RunResult:
        """Run to the end and return the whole answer and the report; closes the run."""
        self._entered = True  # closed below, so safe outside `async with`
        try:
            async for _ in self.events():
                pass
        finally:
            await self.aclose()
        return RunResult("".join(self._answer), self.report)

    @property
    def answer(self) -> str:
        """The answer's text so far."""
        return "".join(self._answer)

    @property
    def report(self) -> RunReport:
        """The report as of now (final once the run has closed)."""
        if self._report is None or not self._closed:
            self._report = self._build_report()
        return self._report

    # -- proposers ---------------------------------------------------------------------------
    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        return task

    def _messages_for(self, agent: Agent, refs: Sequence[Reference] | None) -> list[ChatMessage]:
        """The request messages of a call: the conversation under the agent's system prompt,
        plus the previous layer's references when there is one (first-layer proposers and a
        single-model run have none)."""
        if refs is None:
            return with_system_prompt(self.messages, agent.system_prompt)
        return build_reference_messages(
            self.messages,
            refs,
            templates=self.spec.templates,
            system_prompt=agent.system_prompt,
            max_reference_chars=self.spec.max_reference_chars,
        )

    def _start_layer(self, li: int, refs: Sequence[Reference] | None) -> list[Event]:
        spec = self.spec
        layer = spec.layers[li]
        now = self._clock()
        calls: list[Call] = []
        events: list[Event] = []
        for index, agent in enumerate(layer.agents):
            messages = self._messages_for(agent, refs)
            call = self._new_call(agent, "proposer", li, index, now, messages)
            calls.append(call)
            request = agent.request(messages, max_tokens=layer.max_tokens)
            call.task = self._spawn(self._propose(call, agent, request))
            call.task.add_done_callback(functools.partial(self._proposer_task_done, call))
            events.append(ProposerStarted(li, index, agent.name, now - self._t0))
        self._states.append(
            LayerState(
                calls,
                layer.policy,
                now,
                usable=layer.usable,
                degrade=layer.on_unmet == "degrade",
            )
        )
        return events

    def _proposer_task_done(self, call: Call, task: asyncio.Task[Any]) -> None:
        """A proposer task cancelled before it first ran never entered :meth:`_propose`, so
        never saw its CancelledError: record the cancellation here, whoever cancelled it."""
        if task.cancelled() and call.outcome == "running":
            call.outcome = "cancelled"
            call.ended_at = self._clock()

    def _new_call(
        self,
        agent: Agent,
        role: Literal["proposer", "aggregator"],
        layer: int,
        index: int,
        now: float,
        messages: Sequence[ChatMessage],
    ) -> Call:
        call = Call(
            agent.name,
            index,
            role=role,
            layer=layer,
            model=agent.model,
            provider=agent.provider.name,
            started_at=now,
            prompt_chars=_prompt_chars(messages),
        )
        self._calls.append(call)
        return call

    def _ended(self, call: Call, outcome: Literal["complete", "failed"]) -> None:
        """The reading task saw the answer end: hand the call to the run."""
        call.outcome = outcome
        call.ended_at = self._clock()
        if not call.queued:
            call.queued = True
            self._inbox.put_nowait(call)

    async def _propose(self, call: Call, agent: Agent, request: ChatRequest) -> None:
        put = self._inbox.put_nowait
        pending = call.pending
        clock = self._clock
        try:
            stream = open_stream(agent, request)
            call.stream = stream
            async with stream:
                async for delta in stream:
                    content = delta.content
                    if content:
                        if call.first_token_at is None:
                            call.first_token_at = clock()
                        pending.append(content)
                        if not call.queued:
                            call.queued = True
                            put(call)
                    if delta.finish_reason is not None and call.outcome == "running":
                        # Done at the finish chunk; the tail (usage, [DONE]) is read below
                        # while the run goes on.
                        call.finish_reason = delta.finish_reason
                        self._ended(call, "complete")
            if call.outcome == "running":
                call.finish_reason = stream.finish_reason
                self._ended(call, "complete")
        except asyncio.CancelledError:
            if call.outcome == "running":
                call.outcome = "cancelled"
                call.ended_at = clock()
            raise
        except Exception as exc:
            if call.outcome != "running":
                return  # the answer was complete; only its tail was lost
            if not isinstance(exc, ProviderError):
                # A bug in a provider: report it, don't take the run down.
                log.exception("proposer.crashed", agent=call.agent)
            call.exc = exc
            call.error = (
                str(exc) if isinstance(exc, ProviderError) else f"{type(exc).__name__}: {exc}"
            )
            self._ended(call, "failed")

    def _pool_warm_at_decision(self) -> bool:
        """Whether the aggregator's provider will have warm connections anyway: a ``wait_all``
        first layer with two or more proposers on that provider hands their connections back
        to its pool before it decides, so a pre-warm would only add a request (at the moment
        the run starts, those proposers hold the pool's idle connections, and the provider's
        own check cannot tell)."""
        layer = self.spec.layers[0]
        if not isinstance(layer.policy, WaitAll):
            return False
        provider = self.spec.aggregator.provider
        return sum(1 for a in layer.agents if a.provider is provider) >= 2

    async def _prewarm(self, agent: Agent) -> None:
        try:
            await agent.provider.prewarm()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # pre-warming is an optimisation; its failure is not an error
            log.debug("aggregator.prewarm_failed", agent=agent.name, error=str(exc))

    def _arm_timer(self, state: LayerState, armed: float | None) -> float | None:
        at = state.next_check_at()
        if at == armed:
            return armed
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if at is not None:
            loop = asyncio.get_running_loop()
            when = loop.time() + max(0.0, at - self._clock())
            self._timer = loop.call_at(when, self._inbox.put_nowait, None)
        return at

    def _take(self, call: Call, events: list[Event] | None, now: float) -> None:
        """Feed what ``call``'s task handed over to its layer's state; the events, if wanted."""
        call.queued = False
        state = self._states[call.layer]
        index = call.index
        pending = call.pending
        if events is not None and not call.hedge_reported and call.chunks == 0:
            self._report_hedge(call, events, now)
        if pending:
            if events is None or call.status != "running":
                for text in pending:
                    state.on_delta(index, text, now)
            else:
                t = now - self._t0
                li, agent = call.layer, call.agent
                for text in pending:
                    state.on_delta(index, text, now)
                    events.append(ProposerDelta(li, index, agent, text, t))
            pending.clear()
        outcome = call.outcome
        if outcome == "running" or call.status != "running":
            return
        if outcome == "complete":
            state.on_done(index, now, call.finish_reason)
            if events is not None:
                events.append(
                    ProposerDone(
                        call.layer,
                        index,
                        call.agent,
                        call.text,
                        call.finish_reason,
                        call.usage(),
                        None
                        if call.first_token_at is None
                        else call.first_token_at - call.started_at,
                        now - self._t0,
                    )
                )
        elif outcome == "failed":
            state.on_failed(index, call.error or "failed", now)
            if events is not None:
                events.append(
                    ProposerFailed(
                        call.layer,
                        index,
                        call.agent,
                        call.error or "failed",
                        _error_kind(call.exc),
                        now - self._t0,
                    )
                )

    def _report_hedge(self, call: Call, events: list[Event], now: float) -> None:
        """The ``hedge`` event of ``call``, once its race is decided."""
        hedge = call.hedge
        if hedge is None or (hedge.winner is None and call.outcome == "running"):
            return
        call.hedge_reported = True
        events.append(
            Hedged(
                call.role,
                call.layer,
                call.index,
                call.agent,
                hedge.backup,
                hedge.after_s,
                hedge.winner,
                now - self._t0,
            )
        )

    async def _next_batch(self, li: int, armed: float | None) -> tuple[list[Event], float | None]:
        """Wait for something to happen in layer ``li``; take in everything already queued,
        then ask the policy once. Returns the events and the timer's armed time."""
        state = self._states[li]
        inbox = self._inbox
        armed = self._arm_timer(state, armed)
        item = await inbox.get()
        now = self._clock()
        events: list[Event] = []
        while True:
            if item is None:
                state.on_tick(now)
                armed = None
            elif item.layer == li:
                self._take(item, events, now)
            else:
                self._take(item, None, now)  # a kept straggler of an earlier layer
            if inbox.empty():
                break
            item = inbox.get_nowait()
        state.decide()
        return events, armed

    def _absorb(self) -> None:
        """Take in whatever is still queued, without events, once no layer is waiting any more
        (for the report; before that the queue is the events' source)."""
        if not (self._finished or self._gen_exited.is_set()):
            return
        self._take_queued(self._clock())

    def _take_queued(
        self, now: float, li: int | None = None, events: list[Event] | None = None
    ) -> None:
        """Take in everything queued, timer ticks aside; ``events`` gets layer ``li``'s."""
        inbox = self._inbox
        while not inbox.empty():
            item = inbox.get_nowait()
            if item is not None:
                self._take(item, events if item.layer == li else None, now)

    # -- the run -----------------------------------------------------------------------------
    async def _drive(self) -> AsyncGenerator[Event, None]:
        self._consumer = asyncio.current_task()
        try:
            for event in self._pending:
                yield event
            self._pending.clear()
            refs: tuple[Reference, ...] | None = None
            layers = self.spec.layers
            aggregator_open: tuple[Call, ProviderError | None] | None = None
            for li, layer in enumerate(layers):
                if li > 0:
                    for event in self._start_layer(li, refs):
                        yield event
                state = self._states[li]
                armed: float | None = None
                decision = state.decide()
                while decision is None:
                    events, armed = await self._next_batch(li, armed)
                    for event in events:
                        yield event
                    decision = state.decision
                if self._timer is not None:
                    self._timer.cancel()
                    self._timer = None
                if layer.on_unmet == "raise" and (
                    decision.reason == "degraded" or decision.usable == 0
                ):
                    raise LayerFailedError(
                        f"layer {li}: policy {layer.policy!r} can no longer be met "
                        f"({state.done} completed, {state.failed} failed of {state.n})",
                        layer=li,
                        errors={c.agent: c.exc for c in state.calls if c.exc is not None},
                    )
                cut, agreement = self._cut(li, decision)
                # Proposers' answers go forward only if there is at least one; with none, the
                # next step answers the plain conversation.
                refs = decision.references if decision.usable else None
                last = cut is not None or li == len(layers) - 1
                staircase = last and self.spec.staircase is not None and refs is not None
                if last and not staircase:
                    aggregator_open = await self._open_aggregator(0, self.spec.aggregator, refs)
                if layer.stragglers == "cancel" and not staircase:
                    for index in state.cancel_running():
                        task = state.calls[index].task
                        if task is not None:
                            task.cancel()
                report = LayerReport(
                    li,
                    decision.reason,
                    decision.at - self._t0,
                    self._infos(state, decision),
                    cut,
                    agreement,
                    None if decision.fallback is None else repr(decision.fallback),
                )
                self._layer_reports.append(report)
                yield LayerDone(
                    li,
                    decision.reason,
                    report.references,
                    cut,
                    agreement,
                    report.decided_s,
                    report.fallback,
                )
                if last:
                    break
            if self.spec.staircase is not None and refs is not None:
                # The last layer's proposers run on: each staircase step sees more of them.
                agg_events = self._staircase(len(self._states) - 1)
            else:
                agg_events = self._aggregate(refs, aggregator_open)
            async with contextlib.aclosing(agg_events) as agg_stream:
                async for event in agg_stream:
                    yield event
            if self.spec.staircase is not None and refs is not None:
                self._settle_stragglers(len(self._states) - 1)
            self._ended_at = self._clock()
            self._finished = True
            yield RunDone(self.report, self._ended_at - self._t0)
        except asyncio.CancelledError as exc:
            self._ended_at = self._clock()
            task = asyncio.current_task()
            if self._stop_requested and task is not None and task.uncancel() == 0:
                # aclose() from another task asked this iteration to end: end it quietly.
                self._error = exc
                return
            self._error = exc
            raise
        except BaseException as exc:
            if not isinstance(exc, GeneratorExit):
                self._error = exc
            self._ended_at = self._clock()
            raise
        finally:
            agg = self._aggregator
            if agg is not None and agg.stream is not None:
                # Sent before layer.done was handed out: the caller may leave in between.
                await agg.stream.aclose()
            self._gen_exited.set()

    def _infos(self, state: LayerState, decision: Decision) -> tuple[ReferenceInfo, ...]:
        calls = state.calls
        return tuple(
            ReferenceInfo(
                r.agent,
                r.index,
                r.status,
                len(r.text),
                calls[r.index].usage().completion_tokens if r.status != "failed" else 0,
            )
            for r in decision.references
        )

    def _cut(
        self, li: int, decision: Decision
    ) -> tuple[Literal["agreement", "budget"] | None, float | None]:
        remaining = len(self.spec.layers) - li - 1
        if remaining == 0:
            return None, None  # nothing left to cut: don't spend TTFT measuring agreement
        cut = self.spec.cut
        score: float | None = None
        if cut.agreement is not None:
            texts = [r.text for r in decision.references if r.status == "complete"]
            score = mean_agreement(texts, cut.similarity)
            if score is not None and score >= cut.agreement:
                return "agreement", score
        if cut.ttft_budget is not None:
            layer_time = decision.at - self._states[li].started_at
            if decision.at - self._t0 + layer_time > cut.ttft_budget:
                return "budget", score
        return None, score

    # -- the aggregator ----------------------------------------------------------------------
    async def _open_aggregator(
        self, attempt: int, agent: Agent, refs: tuple[Reference, ...] | None
    ) -> tuple[Call, ProviderError | None]:
        """Build the aggregator's request and send it, in this task: no loop turn between the
        decision and the request. Returns once the response headers arrived (real servers send
        them at once; the first token comes much later) or the attempt failed."""
        messages = self._messages_for(agent, refs)
        temperature, max_tokens, stop = self._overrides
        request = agent.request(messages, temperature=temperature, max_tokens=max_tokens, stop=stop)
        call = self._new_call(
            agent, "aggregator", len(self._states), attempt, self._clock(), messages
        )
        self._aggregator = call
        try:
            stream = open_stream(agent, request)
            call.stream = stream
            await stream.__aenter__()
        except ProviderError as exc:
            if call.stream is not None:
                await call.stream.aclose()
            return call, exc
        except BaseException:
            call.status = "cancelled"
            call.ended_at = self._clock()
            if call.stream is not None:
                await call.stream.aclose()
            raise
        return call, None

    async def _aggregate(
        self,
        refs: tuple[Reference, ...] | None,
        opened: tuple[Call, ProviderError | None] | None,
    ) -> AsyncGenerator[Event, None]:
        spec = self.spec
        errors: dict[str, BaseException] = {}
        clock = self._clock
        t0 = self._t0
        answer = self._answer
        for attempt, agent in enumerate((spec.aggregator, *spec.fallbacks)):
            if opened is None:
                opened = await self._open_aggregator(attempt, agent, refs)
            call, open_error = opened
            opened = None
            yield AggregatorStarted(agent.name, attempt, call.started_at - t0)
            stream = call.stream
            try:
                if open_error is not None:
                    raise open_error
                assert stream is not None
                try:
                    async for delta in stream:
                        content = delta.content
                        if content:
                            now = clock()
                            if call.first_token_at is None:
                                call.first_token_at = now
                                self._first_token_at = now
                                hedge: list[Event] = []
                                self._report_hedge(call, hedge, now)
                                for event in hedge:
                                    yield event
                            call.chunks += 1
                            call.parts.append(content)
                            answer.append(content)
                            yield AggregatorDelta(content, now - t0)
                finally:
                    await stream.aclose()
            except ProviderError as exc:
                call.status = "failed"
                call.exc = exc
                call.error = str(exc)
                call.ended_at = clock()
                errors[agent.name] = exc
                yield AggregatorFailed(
                    agent.name, attempt, call.error, exc.kind, call.ended_at - t0
                )
                if call.first_token_at is not None:
                    raise AggregatorError(
                        f"aggregator {agent.name} failed after it started answering: {exc}",
                        partial_text="".join(answer),
                        errors=errors,
                    ) from exc
                continue
            except BaseException:
                call.status = "cancelled"
                call.ended_at = clock()
                raise
            call.status = "complete"
            call.ended_at = clock()
            call.finish_reason = self._finish_reason = stream.finish_reason
            yield AggregatorDone(
                agent.name,
                call.finish_reason,
                call.usage(),
                None if call.first_token_at is None else call.first_token_at - call.started_at,
                call.ended_at - t0,
            )
            return
        raise AggregatorError(
            "every aggregator failed before answering: "
            + "; ".join(f"{name}: {err}" for name, err in errors.items()),
            errors=errors,
        )

    def _staircase(self, li: int) -> AsyncGenerator[Event, None]:
        temperature, max_tokens, stop = self._overrides
        return run_staircase(
            _StaircaseHost(self, li),
            self.spec,
            self.messages,
            self._answer,
            clock=self._clock,
            t0=self._t0,
            temperature=temperature,
            max_tokens=max_tokens,
            stop=stop,
        )

    def _settle_stragglers(self, li: int) -> None:
        """Cancel the layer's running proposers if its stragglers are ``cancel``."""
        state = self._states[li]
        if self.spec.layers[li].stragglers == "cancel":
            for index in state.cancel_running():
                task = state.calls[index].task
                if task is not None:
                    task.cancel()

    # -- report ------------------------------------------------------------------------------
    def _build_report(self) -> RunReport:
        self._absorb()
        t0 = self._t0
        agents = []
        total = Usage()
        for c in self._calls:
            usage = c.usage()
            total = total + usage
            status: Literal["complete", "partial", "failed", "cancelled"]
            if c.status != "running":
                status = c.status
            elif c.outcome == "cancelled":
                status = "cancelled"
            else:
                status = "partial"
            agents.append(
                AgentReport(
                    agent=c.agent,
                    model=c.model,
                    provider=c.provider,
                    role=c.role,
                    layer=c.layer,
                    index=c.index,
                    status=status,
                    started_s=c.started_at - t0,
                    ttft_s=None if c.first_token_at is None else c.first_token_at - c.started_at,
                    duration_s=None if c.ended_at is None else c.ended_at - c.started_at,
                    usage=usage,
                    chars=c.chars,
                    error=c.error,
                    hedge=c.hedge,
                    request_id=c.request_id,
                )
            )
        end = self._ended_at if self._ended_at is not None else self._clock()
        agg = self._aggregator
        error = self._error
        return RunReport(
            text="".join(self._answer),
            aggregator=agg.agent if agg is not None and agg.status != "failed" else None,
            ttft_s=None if self._first_token_at is None else self._first_token_at - t0,
            time_to_quorum_s=self._layer_reports[0].decided_s if self._layer_reports else None,
            aggregator_ttft_s=(
                None
                if agg is None or agg.first_token_at is None
                else agg.first_token_at - agg.started_at
            ),
            total_s=end - t0,
            usage=total,
            layers=tuple(self._layer_reports),
            agents=tuple(agents),
            finish_reason=self._finish_reason,
            hedges=sum(1 for a in agents if a.hedge is not None),
            error=(
                None
                if error is None
                else "closed before run.done"
                if isinstance(error, asyncio.CancelledError) and self._stop_requested
                else f"{type(error).__name__}: {error}"
            ),
        )


class _StaircaseHost:
    """The run's side of a staircase (:class:`~moa_stream.engine._staircase_run.StaircaseHost`):
    the last layer's references, and the proposers' queued output taken in between the
    aggregator's deltas."""

    def __init__(self, run: MoARun, li: int) -> None:
        self.run = run
        self.li = li
        self.state = run._states[li]

    def references(self) -> list[RefView]:
        return [(c.index, c.agent, c.status, c.text) for c in self.state.calls]

    def running_chunks(self) -> list[tuple[int, int]]:
        return [(c.index, c.chunks) for c in self.state.calls if c.status == "running"]

    def drain(self) -> list[Event]:
        run = self.run
        if run._inbox.empty():
            return []
        events: list[Event] = []
        run._take_queued(run._clock(), self.li, events)
        return events

    async def wait(self, until: float | None) -> list[Event]:
        run = self.run
        timeout = None if until is None else max(0.0, until - run._clock())
        try:
            async with asyncio.timeout(timeout):
                item = await run._inbox.get()
        except TimeoutError:
            return []
        events: list[Event] = []
        if item is not None:
            run._take(item, events if item.layer == self.li else None, run._clock())
        events.extend(self.drain())
        return events

    def give_up(self) -> None:
        self.run._settle_stragglers(self.li)

    def open_step(
        self, agent: Agent, step: int, messages: Sequence[ChatMessage], stream: ProviderStream
    ) -> Call:
        run = self.run
        call = run._new_call(agent, "aggregator", len(run._states), step, run._clock(), messages)
        call.stream = stream
        if run._aggregator is None or run._aggregator.status == "failed":
            run._aggregator = call
        return call

    def step_delta(self, record: Call, text: str, now: float) -> None:
        record.chunks += 1
        if not text:
            return
        record.parts.append(text)
        if record.first_token_at is None:
            record.first_token_at = now
        if self.run._first_token_at is None:
            self.run._first_token_at = now

    def close_step(
        self, record: Call, status: str, finish_reason: str | None, error: BaseException | None
    ) -> None:
        record.ended_at = self.run._clock()
        record.status = status  # type: ignore[assignment]
        if status == "failed" and error is not None:
            record.error = str(error)
            record.exc = error
        elif status == "cancelled" and isinstance(error, Exception) and str(error):
            record.error = str(error)  # a rejected step says why
        if status == "complete":
            record.finish_reason = self.run._finish_reason = finish_reason
