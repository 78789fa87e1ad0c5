"""Running a MoA: the run's life, from its first request to ``run.done``, and its events.

Design, in brief:

- The proposers' fan-in (:class:`~moa_stream.engine.fanin.FanIn`) owns every request's record,
  every task the run starts (one per proposer request, plus the aggregator pre-warm) and the
  one queue the proposers feed; :meth:`MoARun.aclose` has it cancel and await them. No task
  group is held open across a ``yield``: the event generator only reads.
- The event generator runs in the caller's task: it waits on the fan-in's queue, lets each
  layer's policy decide, and then runs the aggregator
  (:func:`~moa_stream.engine.aggregate.aggregate`, one-shot or staircase) in the same task, so
  a token reaches the caller in the loop turn it was parsed in.
- The one-shot aggregator's request is sent in the loop turn of the last layer's decision,
  before ``layer.done`` is handed to the caller.
- Leaving before ``run.done`` (``break``, an exception, a cancelled caller, ``aclose()`` from
  another task) cancels every request at once. Only proposers of ``keep`` layers still running
  after ``run.done`` get ``keep_grace`` seconds to finish, for their accounting.
- The report (:func:`~moa_stream.engine.report.build_report`) is built from the records.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Self

from moa_stream._exceptions import LayerFailedError
from moa_stream._resource import AsyncResource
from moa_stream._types import ChatMessage
from moa_stream.engine._staircase_run import StaircaseStrategy
from moa_stream.engine.aggregate import (
    Answer,
    LayerHost,
    OneShot,
    Strategy,
    aggregate,
    prewarm,
    warm_at_decision,
)
from moa_stream.engine.events import Event, LayerDone, LayerReport, RunDone, RunReport
from moa_stream.engine.fanin import FanIn
from moa_stream.engine.layer import Decision, Reference
from moa_stream.engine.report import build_report, layer_report
from moa_stream.engine.similarity import agreement as mean_agreement

if TYPE_CHECKING:
    from moa_stream.engine.spec import MoA

__all__ = ["MoARun", "RunResult"]


def _cut(
    spec: MoA, li: int, decision: Decision, t0: float, started_at: float
) -> tuple[Literal["agreement", "budget"] | None, float | None]:
    """Whether the run skips its layers after layer ``li`` (which started at ``started_at``),
    and the references' agreement if it was measured."""
    remaining = len(spec.layers) - li - 1
    if remaining == 0:
        return None, None  # nothing left to cut: don't spend TTFT measuring agreement
    cut = spec.cut
    score: float | None = None
    if cut.agreement is not None:
        texts = [r.text for r in decision.references if r.status == "complete"]
        score = mean_agreement(texts, cut.similarity)
        if score is not None and score >= cut.agreement:
            return "agreement", score
    if cut.ttft_budget is not None:
        layer_time = decision.at - started_at
        if decision.at - t0 + layer_time > cut.ttft_budget:
            return "budget", score
    return None, score


@dataclass(frozen=True, slots=True)
class RunResult:
    """What :meth:`MoARun.final` returns: the whole answer and the report."""

    text: str
    report: RunReport


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
        self._fanin = FanIn(spec, messages, clock)
        self._answer = Answer()
        self._layer_reports: list[LayerReport] = []
        self._pending: list[Event] = []
        self._gen: AsyncGenerator[Event, None] | None = None
        self._consumer: asyncio.Task[object] | None = None
        self._gen_exited = asyncio.Event()
        self._stop_requested = False
        self._consumed = False
        self._entered = False
        self._finished = False  # run.done was handed to the caller
        self._closed = False  # aclose() completed its clean-up
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
        spec = self.spec
        fanin = self._fanin
        self._pending.extend(fanin.start())
        if spec.layers and spec.prewarm and not warm_at_decision(spec):
            fanin.spawn(prewarm(spec.aggregator))
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
        self._fanin.stop_timer()
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
        # "keep" stragglers finish for accounting; the answer is out, so this waits for
        # nobody but the caller's clean-up.
        await self._fanin.close(self._keep_grace if self._finished else 0.0)
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
        return RunResult(self._answer.text, self.report)

    @property
    def answer(self) -> str:
        """The answer's text so far."""
        return self._answer.text

    @property
    def report(self) -> RunReport:
        """The report as of now (final once the run has closed)."""
        if self._report is None or not self._closed:
            self._report = self._build_report()
        return self._report

    def _build_report(self) -> RunReport:
        fanin = self._fanin
        if self._finished or self._gen_exited.is_set():
            # No layer is waiting any more: what is still queued only adds to the accounting.
            fanin.absorb()
        error = self._error
        return build_report(
            fanin.calls,
            self._layer_reports,
            self._answer,
            t0=fanin.t0,
            end=self._ended_at if self._ended_at is not None else self._clock(),
            error=(
                None
                if error is None
                else "closed before run.done"
                if isinstance(error, asyncio.CancelledError) and self._stop_requested
                else f"{type(error).__name__}: {error}"
            ),
        )

    # -- the run -----------------------------------------------------------------------------
    async def _drive(self) -> AsyncGenerator[Event, None]:
        self._consumer = asyncio.current_task()
        spec = self.spec
        fanin = self._fanin
        t0 = fanin.t0
        try:
            for event in self._pending:
                yield event
            self._pending.clear()
            refs: tuple[Reference, ...] | None = None
            strategy: Strategy | None = None
            staircase = False
            layers = spec.layers
            for li, layer in enumerate(layers):
                if li > 0:
                    for event in fanin.start_layer(li, refs):
                        yield event
                state = fanin.states[li]
                decision = state.decide()
                while decision is None:
                    for event in await fanin.next_batch(li):
                        yield event
                    decision = state.decision
                fanin.stop_timer()
                if layer.on_unmet == "raise" and (
                    decision.reason == "degraded" or decision.usable == 0
                ):
                    raise LayerFailedError(
                        f"layer {li}: policy {layer.policy!r} can no longer be met "
                        f"({state.done} completed, {state.failed} failed of {state.n})",
                        layer=li,
                        errors={c.agent: c.exc for c in state.calls if c.exc is not None},
                    )
                cut, agreement = _cut(spec, li, decision, t0, state.started_at)
                # Proposers' answers go forward only if there is at least one; with none, the
                # next step answers the plain conversation.
                refs = decision.references if decision.usable else None
                last = cut is not None or li == len(layers) - 1
                staircase = last and spec.staircase is not None and refs is not None
                if last and not staircase:
                    strategy = OneShot(fanin, self._answer, refs, self._overrides)
                    await strategy.send_first()
                if not staircase:
                    fanin.settle_stragglers(li)
                report = layer_report(li, state, decision, t0, cut, agreement)
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
            if staircase:
                # The last layer's proposers run on: each staircase step sees more of them.
                strategy = self._staircase(len(fanin.states) - 1)
            elif strategy is None:  # a single model
                strategy = OneShot(fanin, self._answer, None, self._overrides)
            async with contextlib.aclosing(
                aggregate(strategy, spec, self._answer, fanin)
            ) as agg_stream:
                async for event in agg_stream:
                    yield event
            if staircase:
                fanin.settle_stragglers(len(fanin.states) - 1)
            self._ended_at = self._clock()
            self._finished = True
            yield RunDone(self.report, self._ended_at - t0)
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
            agg = self._answer.call
            if agg is not None and agg.stream is not None:
                # Sent before layer.done was handed out: the caller may leave in between.
                await agg.stream.aclose()
            self._gen_exited.set()

    def _staircase(self, li: int) -> StaircaseStrategy:
        temperature, max_tokens, stop = self._overrides
        return StaircaseStrategy(
            LayerHost(self._fanin, self._answer, li),
            self.spec,
            self.messages,
            self._answer.parts,
            clock=self._clock,
            t0=self._fanin.t0,
            temperature=temperature,
            max_tokens=max_tokens,
            stop=stop,
        )
