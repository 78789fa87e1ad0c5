"""Driving a staircase aggregator: the I/O around :mod:`moa_stream.engine.staircase`.

The run hands over through a small :class:`StaircaseHost`: the references of the last layer
as they stand, a way to take in what the proposers sent meanwhile (``drain`` without waiting,
``wait`` for more), and the book-keeping of each step's request. The aggregator's stream is
read here, in the run's own task, so a token reaches the caller in the loop turn it was parsed
in; between two deltas the proposers' queued chunks are drained (no wait, no queue hop for the
answer) so that, at a step boundary, the references are as fresh as they can be.

At a step boundary (the step wrote its budget of tokens):

- every reference already settled when the step was asked: nothing more can come, so no
  boundary is checked again and the step runs to the end;
- the answer is more than ``lead`` tokens ahead of a reference still being written: the
  stream is closed, and the next step waits until the references catch up (or settle, or are
  given up on);
- the references added something: the stream is closed and the next step asked with it;
- nothing new: the current stream just continues, and the next boundary is one step later.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from moa_stream._exceptions import AggregatorError, ProviderError
from moa_stream._types import ChatMessage, ChatRequest, Usage
from moa_stream.engine.events import (
    AggregatorDelta,
    AggregatorDone,
    AggregatorFailed,
    AggregatorStarted,
    AggregatorStep,
    Event,
)
from moa_stream.engine.staircase import (
    Joiner,
    ReferenceTracker,
    RefView,
    StepPrompts,
    step_sizes,
)

if TYPE_CHECKING:
    from moa_stream.engine.spec import Agent, MoA
    from moa_stream.providers import ProviderStream

__all__ = ["StaircaseHost", "run_staircase"]


class StaircaseHost(Protocol):
    """What the run provides to the staircase (see the module docstring)."""

    def references(self) -> list[RefView]: ...

    def running_tokens(self) -> list[int]:
        """Content chunks so far of each reference still being written."""
        ...

    def drain(self) -> list[Event]:
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


async def run_staircase(
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
) -> AsyncGenerator[Event, None]:
    """The staircase aggregator's events, ending with ``aggregator.done`` (its usage adds up
    every step's request).

    Falls back to the next aggregator while no token has reached the caller; after that a
    failure raises :class:`AggregatorError` with the answer so far.
    """
    staircase = spec.staircase
    assert staircase is not None
    errors: dict[str, BaseException] = {}
    started_at = clock()
    give_up_at = None
    if staircase.give_up_after is not None:
        give_up_at = started_at + staircase.give_up_after
    for attempt, agent in enumerate((spec.aggregator, *spec.fallbacks)):
        continuation = staircase.for_agent(agent.name)
        tracker = ReferenceTracker(spec.templates, spec.max_reference_chars)
        prompts = StepPrompts(messages, continuation, spec.templates, agent.system_prompt)
        request_messages = prompts.first(tracker.first(host.references()))
        extra: dict[str, Any] = {}
        sizes = step_sizes(staircase.steps)
        joiner = Joiner()
        given_up = False
        step = 0
        prefill: str | None = None
        asked_at = clock()
        first_token_at: float | None = None
        usage = Usage()  # of this aggregator's steps so far
        yield AggregatorStarted(agent.name, attempt, asked_at - t0)
        while True:
            refs = host.references()
            final = given_up or tracker.settled(refs)
            text_so_far = "".join(answer)
            yield AggregatorStep(
                agent.name,
                step,
                str(continuation),
                tracker.infos(refs),
                len(text_so_far),
                final,
                clock() - t0,
            )
            request = _request(agent, request_messages, extra, temperature, max_tokens, stop)
            if max_tokens is not None and step > 0:
                # ``max_tokens`` bounds the whole answer, as for a single request.
                request = _with_max_tokens(request, max(1, max_tokens - len(answer)))
            joiner.begin(text_so_far, prefill, echoes=continuation.echoes)
            stream = agent.provider.stream(request)
            record = host.open_step(agent, step, request_messages, stream)
            budget = next(sizes)
            written = 0
            step_text: list[str] = []
            cut = False
            try:
                async with stream:
                    async for delta in stream:
                        content = delta.content
                        if content:
                            written += 1
                            text = joiner.feed(content)
                            now = clock()
                            host.step_delta(record, text, now)
                            if text:
                                if first_token_at is None:
                                    first_token_at = now
                                answer.append(text)
                                step_text.append(text)
                                yield AggregatorDelta(text, now - t0)
                        for event in host.drain():
                            yield event
                        if final or written < budget:
                            continue
                        refs = host.references()
                        if give_up_at is not None and clock() >= give_up_at:
                            given_up = True
                            host.give_up()
                        if _ahead(answer, host.running_tokens(), staircase.lead, given_up):
                            cut = True
                            break
                        if tracker.has_news(refs, given_up=given_up):
                            cut = True
                            break
                        budget += next(sizes)
                    rest = joiner.flush()
                    if rest:
                        now = clock()
                        host.step_delta(record, rest, now)
                        answer.append(rest)
                        step_text.append(rest)
                        yield AggregatorDelta(rest, now - t0)
            except ProviderError as exc:
                errors[agent.name] = exc
                host.close_step(record, "failed", None, exc)
                if answer:
                    raise AggregatorError(
                        f"aggregator {agent.name} failed at step {step + 1} of its answer: {exc}",
                        partial_text="".join(answer),
                        errors=errors,
                    ) from exc
                yield AggregatorFailed(agent.name, attempt, str(exc), exc.kind, clock() - t0)
                break
            except BaseException as exc:
                host.close_step(record, "cancelled", None, exc)
                raise
            if not cut:
                host.close_step(record, "complete", stream.finish_reason, None)
                yield AggregatorDone(
                    agent.name,
                    stream.finish_reason,
                    usage + (stream.usage or Usage(estimated=True)),
                    None if first_token_at is None else first_token_at - asked_at,
                    clock() - t0,
                )
                return
            host.close_step(record, "cancelled", None, None)
            usage = usage + (stream.usage or Usage(estimated=True))
            # The next step: wait while the answer is too far ahead (or, having stopped for
            # that, while there is nothing new yet), then ask with the news.
            while (running := host.running_tokens()) and (
                _ahead(answer, running, staircase.lead, given_up)
                or not tracker.has_news(host.references(), given_up=given_up)
            ):
                if given_up:
                    break
                if give_up_at is not None and clock() >= give_up_at:
                    given_up = True
                    host.give_up()
                    break
                for event in await host.wait(give_up_at):
                    yield event
            for event in host.drain():
                yield event
            refs = host.references()
            parts = tracker.gains(refs, given_up=given_up)
            whole = "".join(answer)
            request_messages, extra = prompts.next(parts, "".join(step_text), whole)
            prefill = whole.rstrip() if continuation.method == "prefill" else None
            step += 1
    raise AggregatorError(
        "every aggregator failed before answering: "
        + "; ".join(f"{name}: {err}" for name, err in errors.items()),
        errors=errors,
    )


def _ahead(answer: list[str], running: Sequence[int], lead: int | None, given_up: bool) -> bool:
    """Whether the answer is more than ``lead`` chunks ahead of a reference being written."""
    if lead is None or given_up or not running:
        return False
    return len(answer) - min(running) > lead


def _request(
    agent: Agent,
    messages: list[ChatMessage],
    extra: dict[str, Any],
    temperature: float | None,
    max_tokens: int | None,
    stop: tuple[str, ...] | None,
) -> ChatRequest:
    request = agent.request(messages, temperature=temperature, max_tokens=max_tokens, stop=stop)
    if not extra:
        return request
    return ChatRequest(
        messages=request.messages,
        model=request.model,
        temperature=request.temperature,
        max_tokens=request.max_tokens,
        stop=request.stop,
        extra={**request.extra, **extra},
    )


def _with_max_tokens(request: ChatRequest, n: int) -> ChatRequest:
    return ChatRequest(
        messages=request.messages,
        model=request.model,
        temperature=request.temperature,
        max_tokens=n,
        stop=request.stop,
        extra=request.extra,
    )
