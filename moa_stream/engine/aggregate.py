"""The aggregator: one fallback loop, and the two ways it answers.

:func:`aggregate` tries the aggregator, then each fallback in turn while no token has reached
the caller; once one has, a failure raises :class:`~moa_stream.AggregatorError` with the answer
so far. Each try is started by a :class:`Strategy`:

- :class:`OneShot`: one request over the last layer's references. Its first request is sent by
  the run in the loop turn the layer decided, before ``layer.done`` reaches the caller
  (:meth:`OneShot.send_first`), so neither a task hop nor the caller's handling of
  ``layer.done`` costs TTFT.
- the staircase (:class:`~moa_stream.engine._staircase_run.StaircaseStrategy`): a driver that
  asks the aggregator again, in steps, as the references grow; it reads the proposers' output
  through :class:`LayerHost`.

A one-shot try is a :class:`Request` whose stream the loop reads *itself*, and a staircase's
are :class:`Steps` whose events it passes on: no generator sits between the socket and the run
that was not there before, so a token reaches the caller in the loop turn it was parsed in,
and nothing is allocated per token beyond the event.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import structlog

from moa_stream._exceptions import AggregatorError, ProviderError
from moa_stream._types import ChatMessage
from moa_stream.engine.events import (
    AggregatorDelta,
    AggregatorDone,
    AggregatorFailed,
    AggregatorStarted,
    Event,
)
from moa_stream.engine.layer import Call, Reference
from moa_stream.engine.policies import WaitAll
from moa_stream.engine.streams import open_stream

if TYPE_CHECKING:
    from moa_stream.engine.fanin import FanIn
    from moa_stream.engine.spec import Agent, MoA
    from moa_stream.engine.staircase import RefView
    from moa_stream.providers import ProviderStream

__all__ = [
    "Answer",
    "LayerHost",
    "OneShot",
    "Request",
    "Steps",
    "Strategy",
    "aggregate",
    "prewarm",
    "warm_at_decision",
]

#: The run's logger: its lines keep one name whichever of its modules writes them.
log = structlog.get_logger("moa_stream.engine.run")

#: The answer's parameters set by the run's caller: temperature, max_tokens, stop.
Overrides = tuple[float | None, int | None, tuple[str, ...] | None]


class Answer:
    """The answer as it is written: its pieces, the aggregator request that stands for it in
    the report (the latest one sent, until one of them answers), when its first token reached
    the caller, and why it ended."""

    __slots__ = ("call", "finish_reason", "first_token_at", "parts")

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.call: Call | None = None
        self.first_token_at: float | None = None
        self.finish_reason: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)


@dataclass(slots=True)
class Request:
    """A try that is one request, sent (``error``: sending it failed): :func:`aggregate`
    reads its stream."""

    call: Call
    error: ProviderError | None = None


class Outcome(Protocol):
    """How a :class:`Steps` try ended, read once its events are over: ``done`` when it
    answered, else ``error`` says why not."""

    done: bool
    error: ProviderError | None


@dataclass(slots=True)
class Steps:
    """A try that reads its own requests and makes its own events (a staircase's driver)."""

    started_at: float
    events: AsyncGenerator[Event, None]
    outcome: Outcome


class Strategy(Protocol):
    """How the aggregator answers: starts the try of the ``attempt``-th agent of the chain."""

    async def begin(self, attempt: int, agent: Agent) -> Request | Steps: ...


async def aggregate(
    strategy: Strategy, spec: MoA, answer: Answer, fanin: FanIn
) -> AsyncGenerator[Event, None]:
    """The aggregator's events, from its ``aggregator.started`` to its ``aggregator.done``.

    ``spec.aggregator`` first, then each of ``spec.fallbacks`` while no token has reached the
    caller; after that a failure raises :class:`AggregatorError` with the answer so far (a
    staircase raises it itself, saying at which step).
    """
    errors: dict[str, BaseException] = {}
    clock = fanin.clock
    t0 = fanin.t0
    parts = answer.parts
    for attempt, agent in enumerate((spec.aggregator, *spec.fallbacks)):
        begun = await strategy.begin(attempt, agent)
        if isinstance(begun, Steps):
            yield AggregatorStarted(agent.name, attempt, begun.started_at - t0)
            async with contextlib.aclosing(begun.events) as events:
                async for event in events:
                    yield event
            if begun.outcome.done:
                return
            error = begun.outcome.error
            assert error is not None
            failed_at = clock()
            answered = False
        else:
            call, error = begun.call, begun.error
            yield AggregatorStarted(agent.name, attempt, call.started_at - t0)
            stream = call.stream
            try:
                if error is not None:
                    raise error
                assert stream is not None
                try:
                    async for delta in stream:
                        content = delta.content
                        if content:
                            now = clock()
                            if call.first_token_at is None:
                                call.first_token_at = now
                                answer.first_token_at = now
                                hedged = fanin.hedge_event(call, now)
                                if hedged is not None:
                                    yield hedged
                            call.chunks += 1
                            call.parts.append(content)
                            parts.append(content)
                            yield AggregatorDelta(content, now - t0)
                finally:
                    await stream.aclose()
            except ProviderError as exc:
                error = exc
            except BaseException:
                call.status = "cancelled"
                call.ended_at = clock()
                raise
            else:
                call.status = "complete"
                call.ended_at = clock()
                call.finish_reason = answer.finish_reason = stream.finish_reason
                yield AggregatorDone(
                    agent.name,
                    call.finish_reason,
                    call.usage(),
                    None if call.first_token_at is None else call.first_token_at - call.started_at,
                    call.ended_at - t0,
                )
                return
            call.status = "failed"
            call.exc = error
            call.error = str(error)
            failed_at = call.ended_at = clock()
            answered = call.first_token_at is not None
        errors[agent.name] = error
        yield AggregatorFailed(agent.name, attempt, str(error), error.kind, failed_at - t0)
        if answered:
            raise AggregatorError(
                f"aggregator {agent.name} failed after it started answering: {error}",
                partial_text="".join(parts),
                errors=errors,
            ) from error
    raise AggregatorError(
        "every aggregator failed before answering: "
        + "; ".join(f"{name}: {err}" for name, err in errors.items()),
        errors=errors,
    )


class OneShot:
    """The aggregator answers in one request per try, over ``refs`` (``None``: the plain
    conversation, for a single model or a layer with no usable answer)."""

    def __init__(
        self,
        fanin: FanIn,
        answer: Answer,
        refs: tuple[Reference, ...] | None,
        overrides: Overrides,
    ) -> None:
        self.fanin = fanin
        self.answer = answer
        self.refs = refs
        self.overrides = overrides
        self._first: Request | None = None

    async def send_first(self) -> None:
        """Send the first try's request now (it is the next :meth:`begin`'s)."""
        self._first = await self.open(0, self.fanin.spec.aggregator)

    async def begin(self, attempt: int, agent: Agent) -> Request:
        first = self._first
        if first is not None:
            self._first = None
            return first
        return await self.open(attempt, agent)

    async def open(self, attempt: int, agent: Agent) -> Request:
        """Build the aggregator's request and send it, in this task: no loop turn between the
        decision and the request. Returns once the response headers arrived (real servers send
        them at once; the first token comes much later) or the attempt failed."""
        fanin = self.fanin
        messages = fanin.messages_for(agent, self.refs)
        temperature, max_tokens, stop = self.overrides
        request = agent.request(messages, temperature=temperature, max_tokens=max_tokens, stop=stop)
        call = fanin.record(
            agent, "aggregator", len(fanin.states), attempt, fanin.clock(), messages
        )
        self.answer.call = call
        try:
            stream = open_stream(agent, request)
            call.stream = stream
            await stream.__aenter__()
        except ProviderError as exc:
            if call.stream is not None:
                await call.stream.aclose()
            return Request(call, exc)
        except BaseException:
            call.status = "cancelled"
            call.ended_at = fanin.clock()
            if call.stream is not None:
                await call.stream.aclose()
            raise
        return Request(call)


class LayerHost:
    """The run's side of a staircase (:class:`~moa_stream.engine._staircase_run.StaircaseHost`)
    over the fan-in: layer ``li``'s references as they stand, the proposers' output taken in
    between the aggregator's deltas, and each step's record among the run's calls."""

    def __init__(self, fanin: FanIn, answer: Answer, li: int) -> None:
        self.fanin = fanin
        self.answer = answer
        self.li = li
        self.calls = fanin.states[li].calls
        # Called between every two deltas of the answer: the fan-in's own, no call between.
        self.drain: Callable[[], Sequence[Event]] = functools.partial(fanin.drain, li)

    def references(self) -> list[RefView]:
        return [
            (c.index, c.agent, c.status, c.reference_text if c.status == "complete" else c.text)
            for c in self.calls
        ]

    def running_chunks(self) -> list[tuple[int, int]]:
        return [(c.index, c.chunks) for c in self.calls if c.status == "running"]

    async def wait(self, until: float | None) -> list[Event]:
        return await self.fanin.wait(self.li, until)

    def give_up(self) -> None:
        self.fanin.settle_stragglers(self.li)

    def open_step(
        self, agent: Agent, step: int, messages: Sequence[ChatMessage], stream: ProviderStream
    ) -> Call:
        fanin = self.fanin
        call = fanin.record(agent, "aggregator", len(fanin.states), step, fanin.clock(), messages)
        call.stream = stream
        answer = self.answer
        if answer.call is None or answer.call.status == "failed":
            answer.call = call
        return call

    def step_delta(self, record: Call, text: str, now: float) -> None:
        record.chunks += 1
        if not text:
            return
        record.parts.append(text)
        if record.first_token_at is None:
            record.first_token_at = now
        if self.answer.first_token_at is None:
            self.answer.first_token_at = now

    def close_step(
        self, record: Call, status: str, finish_reason: str | None, error: BaseException | None
    ) -> None:
        record.ended_at = self.fanin.clock()
        record.status = status  # type: ignore[assignment]
        if status == "failed" and error is not None:
            record.error = str(error)
            record.exc = error
        elif status == "cancelled" and isinstance(error, Exception) and str(error):
            record.error = str(error)  # a rejected step says why
        if status == "complete":
            record.finish_reason = self.answer.finish_reason = finish_reason


def warm_at_decision(spec: MoA) -> bool:
    """Whether the aggregator's provider will have warm connections anyway: a ``wait_all``
    first layer with two or more proposers on that provider hands their connections back
    to its pool before it decides, so a pre-warm would only add a request (at the moment
    the run starts, those proposers hold the pool's idle connections, and the provider's
    own check cannot tell)."""
    layer = spec.layers[0]
    if not isinstance(layer.policy, WaitAll):
        return False
    provider = spec.aggregator.provider
    return sum(1 for a in layer.agents if a.provider is provider) >= 2


async def prewarm(agent: Agent) -> None:
    """Open a connection to ``agent``'s provider ahead of its request."""
    try:
        await agent.provider.prewarm()
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # pre-warming is an optimisation; its failure is not an error
        log.debug("aggregator.prewarm_failed", agent=agent.name, error=str(exc))
