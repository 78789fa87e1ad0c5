"""Running a MoA: proposer fan-out, policy decisions, the streamed aggregator.

Design, in brief:

- The run owns every task it starts (one per proposer request, plus the aggregator pre-warm) in
  a plain set, cancelled and awaited in :meth:`MoARun.aclose`. No task group is held open across
  a ``yield``: the event generator only reads.
- Proposer tasks push ``(kind, layer, index, payload)`` tuples into one ``asyncio.Queue``: the
  single fan-in. The consumer's own task pulls from it, feeds the pure
  :class:`~moa_stream.engine.layer.LayerState`, and acts on its decision.
- The aggregator stream is read in the consumer's task itself, so a token is handed to the
  caller in the same loop turn it was parsed in: no queue hop, no buffering.
- Deadlines are one ``loop.call_at`` timer per layer that drops a tick into the same queue.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Self

import structlog

from moa_stream._exceptions import (
    AggregatorError,
    LayerFailedError,
    ProviderError,
)
from moa_stream._resource import AsyncResource
from moa_stream._types import ChatMessage, ChatRequest, Usage
from moa_stream.engine.events import (
    AgentReport,
    AggregatorDelta,
    AggregatorDone,
    AggregatorFailed,
    AggregatorStarted,
    Event,
    LayerDone,
    LayerReport,
    ProposerDelta,
    ProposerDone,
    ProposerFailed,
    ProposerStarted,
    RunDone,
    RunReport,
)
from moa_stream.engine.layer import Decision, LayerState, Reference
from moa_stream.engine.prompts import build_reference_messages, with_system_prompt
from moa_stream.engine.similarity import agreement as mean_agreement
from moa_stream.engine.spec import Agent, Layer, MoA
from moa_stream.providers import ProviderStream

__all__ = ["MoARun", "RunResult"]

log = structlog.get_logger(__name__)

_DELTA, _DONE, _FAILED, _TICK = 0, 1, 2, 3
_Item = tuple[int, int, int, Any]


@dataclass(frozen=True, slots=True)
class RunResult:
    """What :meth:`MoARun.final` returns: the whole answer and the report."""

    text: str
    report: RunReport


class _Call:
    """Book-keeping of one upstream request of the run."""

    __slots__ = (
        "agent",
        "chars",
        "ended_at",
        "error",
        "exc",
        "first_token_at",
        "index",
        "layer",
        "prompt_chars",
        "role",
        "started_at",
        "status",
        "stream",
        "task",
        "tokens",
    )

    def __init__(
        self,
        agent: Agent,
        role: Literal["proposer", "aggregator"],
        layer: int,
        index: int,
        started_at: float,
        prompt_chars: int,
    ) -> None:
        self.agent = agent
        self.role: Literal["proposer", "aggregator"] = role
        self.layer = layer
        self.index = index
        self.started_at = started_at
        self.prompt_chars = prompt_chars
        self.first_token_at: float | None = None
        self.ended_at: float | None = None
        self.status: Literal["running", "complete", "failed", "cancelled"] = "running"
        self.error: str | None = None
        self.exc: BaseException | None = None
        self.tokens = 0
        self.chars = 0
        self.stream: ProviderStream | None = None
        self.task: asyncio.Task[None] | None = None

    def usage(self) -> Usage:
        server = self.stream.usage if self.stream is not None else None
        if server is not None and not server.estimated:
            return server
        return Usage((self.prompt_chars + 3) // 4, self.tokens, estimated=True)


def _prompt_chars(messages: Sequence[ChatMessage]) -> int:
    return sum(len(m["content"]) for m in messages)


class MoARun(AsyncResource):
    """One run of a :class:`~moa_stream.engine.spec.MoA`; create it with ``moa.stream(...)``.

    Use it as an async context manager. Inside, consume exactly one of :meth:`events` (every
    typed event), :meth:`text` (the answer's text pieces as they arrive) or :meth:`final`
    (everything at once). Leaving the block, at any point, cancels every upstream request the
    run still has open and waits until they are closed.
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
        self._inbox: asyncio.Queue[_Item] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()
        self._calls: list[_Call] = []
        self._layer_states: list[LayerState] = []
        self._layer_calls: list[list[_Call]] = []  # [layer][proposer index]
        self._layer_reports: list[LayerReport] = []
        self._pending: list[Event] = []
        self._timer: asyncio.TimerHandle | None = None
        self._gen: AsyncGenerator[Event, None] | None = None
        self._consumed = False
        self._entered = False
        self._closed = False
        self._t0 = 0.0
        self._answer: list[str] = []
        self._first_token_at: float | None = None
        self._aggregator: _Call | None = None
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
            if spec.prewarm:
                self._spawn(self._prewarm(spec.aggregator))
        self._gen = self._drive()

    async def aclose(self) -> None:
        """Cancel whatever is still running and wait until it has stopped. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        if self._gen is not None:
            with contextlib.suppress(RuntimeError):  # already running in another task
                await self._gen.aclose()
        kept = [t for t in self._tasks if not t.done()]
        if kept and self._error is None and self._keep_grace > 0:
            # "keep" stragglers finish for accounting; the answer is out, so this waits for
            # nobody but the caller's clean-up.
            await asyncio.wait(kept, timeout=self._keep_grace)
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
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
        """The report as of now (final once the run has ended and closed)."""
        if self._report is None or not self._closed:
            self._report = self._build_report()
        return self._report

    # -- proposers ---------------------------------------------------------------------------
    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        return task

    def _start_layer(self, li: int, refs: Sequence[Reference] | None) -> list[Event]:
        layer: Layer = self.spec.layers[li]
        now = self._clock()
        state = LayerState([a.name for a in layer.agents], layer.policy, now)
        self._layer_states.append(state)
        calls: list[_Call] = []
        self._layer_calls.append(calls)
        events: list[Event] = []
        for index, agent in enumerate(layer.agents):
            if refs is None:
                messages = with_system_prompt(self.messages, agent.system_prompt)
            else:
                messages = build_reference_messages(
                    self.messages,
                    refs,
                    templates=self.spec.templates,
                    system_prompt=agent.system_prompt,
                    max_reference_chars=self.spec.max_reference_chars,
                )
            call = _Call(agent, "proposer", li, index, now, _prompt_chars(messages))
            self._calls.append(call)
            calls.append(call)
            call.task = self._spawn(self._propose(call, agent.request(messages)))
            events.append(ProposerStarted(li, index, agent.name, now - self._t0))
        return events

    async def _propose(self, call: _Call, request: ChatRequest) -> None:
        put = self._inbox.put_nowait
        layer, index = call.layer, call.index
        stream = call.agent.provider.stream(request)
        call.stream = stream
        try:
            async with stream:
                async for delta in stream:
                    content = delta.content
                    if content:
                        if call.first_token_at is None:
                            call.first_token_at = self._clock()
                        call.tokens += 1
                        call.chars += len(content)
                        put((_DELTA, layer, index, content))
            call.status = "complete"
            call.ended_at = self._clock()
            put((_DONE, layer, index, stream.finish_reason))
        except asyncio.CancelledError:
            call.status = "cancelled"
            call.ended_at = self._clock()
            raise
        except ProviderError as exc:
            call.status = "failed"
            call.error = str(exc)
            call.exc = exc
            call.ended_at = self._clock()
            put((_FAILED, layer, index, exc))
        except Exception as exc:  # a bug in a provider: report it, don't take the run down
            log.exception("proposer.crashed", agent=call.agent.name)
            call.status = "failed"
            call.error = f"{type(exc).__name__}: {exc}"
            call.exc = exc
            call.ended_at = self._clock()
            put((_FAILED, layer, index, exc))

    async def _prewarm(self, agent: Agent) -> None:
        try:
            await agent.provider.prewarm()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # pre-warming is an optimisation; its failure is not an error
            log.debug("aggregator.prewarm_failed", agent=agent.name, error=str(exc))

    def _arm_timer(self, state: LayerState, li: int, armed: float | None) -> float | None:
        at = state.next_check_at()
        if at == armed:
            return armed
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if at is not None:
            loop = asyncio.get_running_loop()
            when = loop.time() + max(0.0, at - self._clock())
            self._timer = loop.call_at(when, self._inbox.put_nowait, (_TICK, li, -1, None))
        return at

    async def _run_layer(self, li: int) -> AsyncGenerator[Event | Decision, None]:
        state = self._layer_states[li]
        calls = self._layer_calls[li]
        get = self._inbox.get
        clock = self._clock
        t0 = self._t0
        armed: float | None = None
        decision: Decision | None = None
        while decision is None:
            armed = self._arm_timer(state, li, armed)
            kind, layer, index, payload = await get()
            if layer != li:
                continue  # a kept straggler of an earlier layer: accounted in its _Call
            now = clock()
            if kind == _DELTA:
                decision = state.on_delta(index, payload, now)
                yield ProposerDelta(li, index, state.slots[index].agent, payload, now - t0)
            elif kind == _DONE:
                decision = state.on_done(index, now)
                call = calls[index]
                yield ProposerDone(
                    li,
                    index,
                    call.agent.name,
                    state.slots[index].text,
                    payload,
                    call.usage(),
                    None if call.first_token_at is None else call.first_token_at - call.started_at,
                    now - t0,
                )
            elif kind == _FAILED:
                decision = state.on_failed(index, str(payload), now)
                kind_name = payload.kind if isinstance(payload, ProviderError) else "internal"
                yield ProposerFailed(
                    li, index, state.slots[index].agent, str(payload), kind_name, now - t0
                )
            else:
                armed = None
                decision = state.on_tick(now)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        yield decision

    # -- the run -----------------------------------------------------------------------------
    async def _drive(self) -> AsyncGenerator[Event, None]:
        try:
            for event in self._pending:
                yield event
            self._pending.clear()
            refs: tuple[Reference, ...] | None = None
            layers = self.spec.layers
            for li, layer in enumerate(layers):
                if li > 0:
                    for event in self._start_layer(li, refs):
                        yield event
                decision: Decision | None = None
                async with contextlib.aclosing(self._run_layer(li)) as layer_events:
                    async for item in layer_events:
                        if isinstance(item, Decision):
                            decision = item
                        else:
                            yield item
                assert decision is not None
                self._settle_stragglers(li, layer)
                if layer.on_unmet == "raise" and (
                    decision.reason == "degraded" or decision.usable == 0
                ):
                    state = self._layer_states[li]
                    raise LayerFailedError(
                        f"layer {li}: policy {layer.policy!r} can no longer be met "
                        f"({state.done} completed, {state.failed} failed of {state.n})",
                        layer=li,
                        errors={
                            c.agent.name: c.exc for c in self._layer_calls[li] if c.exc is not None
                        },
                    )
                cut, agreement = self._cut(li, decision)
                report = LayerReport(
                    li, decision.reason, decision.at - self._t0, decision.infos(), cut, agreement
                )
                self._layer_reports.append(report)
                yield LayerDone(
                    li, decision.reason, report.references, cut, agreement, report.decided_s
                )
                refs = decision.references
                if cut is not None:
                    break
            async with contextlib.aclosing(self._aggregate(refs)) as aggregator_events:
                async for event in aggregator_events:
                    yield event
            self._ended_at = self._clock()
            yield RunDone(self.report, self._ended_at - self._t0)
        except BaseException as exc:
            if not isinstance(exc, GeneratorExit):
                self._error = exc
            self._ended_at = self._clock()
            raise

    def _settle_stragglers(self, li: int, layer: Layer) -> None:
        state = self._layer_states[li]
        if layer.stragglers == "cancel":
            calls = self._layer_calls[li]
            for index in state.cancel_running():
                task = calls[index].task
                if task is not None:
                    task.cancel()

    def _cut(
        self, li: int, decision: Decision
    ) -> tuple[Literal["agreement", "budget"] | None, float | None]:
        cut = self.spec.cut
        remaining = len(self.spec.layers) - li - 1
        score: float | None = None
        if cut.agreement is not None:
            texts = [r.text for r in decision.references if r.status == "complete"]
            score = mean_agreement(texts, cut.similarity)
        if remaining == 0:
            return None, score
        if score is not None and cut.agreement is not None and score >= cut.agreement:
            return "agreement", score
        if cut.ttft_budget is not None:
            layer_time = decision.at - self._layer_states[li].started_at
            if decision.at - self._t0 + layer_time > cut.ttft_budget:
                return "budget", score
        return None, score

    async def _aggregate(self, refs: tuple[Reference, ...] | None) -> AsyncGenerator[Event, None]:
        spec = self.spec
        temperature, max_tokens, stop = self._overrides
        layer_no = len(self._layer_states)
        errors: dict[str, BaseException] = {}
        clock = self._clock
        t0 = self._t0
        answer = self._answer
        for attempt, agent in enumerate((spec.aggregator, *spec.fallbacks)):
            if refs is None:
                messages = with_system_prompt(self.messages, agent.system_prompt)
            else:
                messages = build_reference_messages(
                    self.messages,
                    refs,
                    templates=spec.templates,
                    system_prompt=agent.system_prompt,
                    max_reference_chars=spec.max_reference_chars,
                )
            request = agent.request(
                messages, temperature=temperature, max_tokens=max_tokens, stop=stop
            )
            now = clock()
            call = _Call(agent, "aggregator", layer_no, attempt, now, _prompt_chars(messages))
            self._calls.append(call)
            self._aggregator = call
            yield AggregatorStarted(agent.name, attempt, now - t0)
            stream = agent.provider.stream(request)
            call.stream = stream
            try:
                async with stream:
                    async for delta in stream:
                        content = delta.content
                        if content:
                            now = clock()
                            if call.first_token_at is None:
                                call.first_token_at = now
                                self._first_token_at = now
                            call.tokens += 1
                            call.chars += len(content)
                            answer.append(content)
                            yield AggregatorDelta(content, now - t0)
            except ProviderError as exc:
                call.status = "failed"
                call.error = str(exc)
                call.ended_at = clock()
                errors[agent.name] = exc
                if call.first_token_at is not None:
                    raise AggregatorError(
                        f"aggregator {agent.name} failed after it started answering: {exc}",
                        partial_text="".join(answer),
                        errors=errors,
                    ) from exc
                yield AggregatorFailed(agent.name, attempt, str(exc), exc.kind, call.ended_at - t0)
                continue
            except BaseException:
                call.status = "cancelled"
                call.ended_at = clock()
                raise
            call.status = "complete"
            call.ended_at = clock()
            self._finish_reason = stream.finish_reason
            yield AggregatorDone(
                agent.name,
                stream.finish_reason,
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

    # -- report ------------------------------------------------------------------------------
    def _build_report(self) -> RunReport:
        t0 = self._t0
        agents = []
        total = Usage()
        for c in self._calls:
            usage = c.usage()
            total = total + usage
            status: Literal["complete", "partial", "failed", "cancelled"]
            status = "partial" if c.status == "running" else c.status
            agents.append(
                AgentReport(
                    agent=c.agent.name,
                    model=c.agent.model,
                    provider=c.agent.provider.name,
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
                )
            )
        end = self._ended_at if self._ended_at is not None else self._clock()
        agg = self._aggregator
        return RunReport(
            text="".join(self._answer),
            aggregator=agg.agent.name if agg is not None and agg.status != "failed" else None,
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
            error=None if self._error is None else f"{type(self._error).__name__}: {self._error}",
        )
