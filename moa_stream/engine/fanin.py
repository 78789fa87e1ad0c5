"""The proposers' fan-in: every request a run sends, and the one queue its proposers report to.

- Each request has one record, a :class:`~moa_stream.engine.layer.Call`, kept in
  :attr:`FanIn.calls` in the order sent (the aggregator's too: :meth:`FanIn.record`).
- A proposer's task appends what it reads to its call's ``pending`` list and puts the *call*
  (not the chunk) into one queue (:class:`_Inbox`), once until the run has taken it in: one
  queue operation per wake-up rather than per chunk. The reader (:meth:`FanIn.next_batch`, in the
  run's own task) takes from the queue, drains everything already queued, feeds it all to the
  pure :class:`~moa_stream.engine.layer.LayerState`, and only then asks the policy: a
  proposer's last chunk and its end, read in the same loop turn, are decided on together.
- A proposer is done at its finish chunk: its task reads the stream's tail (usage, ``[DONE]``)
  on its own while the run goes on.
- Deadlines are one ``loop.call_at`` timer per layer that puts ``None`` (a tick) in the queue.
- Every task of the run is started by :meth:`FanIn.spawn` and ended by :meth:`FanIn.close`.

The run and the staircase use only the methods below; the queue, the tasks and the timer are
the fan-in's alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, Literal

import structlog

from moa_stream._exceptions import ProviderError
from moa_stream._types import ChatMessage, ChatRequest
from moa_stream.engine.events import (
    Event,
    Hedged,
    ProposerDelta,
    ProposerDone,
    ProposerFailed,
    ProposerStarted,
)
from moa_stream.engine.layer import Call, LayerState, Reference
from moa_stream.engine.prompts import build_reference_messages, with_system_prompt
from moa_stream.engine.streams import open_stream

if TYPE_CHECKING:
    from moa_stream.engine.spec import Agent, MoA

__all__ = ["FanIn"]

#: The run's logger: its lines keep one name whichever of its modules writes them.
log = structlog.get_logger("moa_stream.engine.run")


def _prompt_chars(messages: Sequence[ChatMessage]) -> int:
    return sum(len(m["content"]) for m in messages)


def _error_kind(exc: BaseException | None) -> str:
    return exc.kind if isinstance(exc, ProviderError) else "internal"


def _ended(
    call: Call,
    outcome: Literal["complete", "failed"],
    put: Callable[[Call], None],
    clock: Callable[[], float],
) -> None:
    """The reading task saw the answer end: hand the call to the run."""
    call.outcome = outcome
    call.ended_at = clock()
    if not call.queued:
        call.queued = True
        put(call)


async def _propose(
    call: Call,
    agent: Agent,
    request: ChatRequest,
    put: Callable[[Call], None],
    clock: Callable[[], float],
) -> None:
    """A proposer request's task: it reads the stream into ``call`` and hands the call to the
    fan-in's queue (``put``) whenever there is something new and it is not queued already."""
    pending = call.pending
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
                    _ended(call, "complete", put, clock)
        if call.outcome == "running":
            call.finish_reason = stream.finish_reason
            _ended(call, "complete", put, clock)
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
        call.error = str(exc) if isinstance(exc, ProviderError) else f"{type(exc).__name__}: {exc}"
        _ended(call, "failed", put, clock)


class _Inbox:
    """The fan-in's queue: calls with something new, ``None`` for a policy timer's tick.

    An ``asyncio.Queue`` without what the fan-in has no use for (a size limit, task
    accounting, its event for ``join``), which it pays for on every put: a put is an append
    and, when the run is waiting, one wake-up. Waiters are served in order, and a cancelled
    ``get`` leaves the queue as it was (like ``asyncio.Queue``).
    """

    __slots__ = ("_items", "_waiters")

    def __init__(self) -> None:
        self._items: deque[Call | None] = deque()
        self._waiters: deque[asyncio.Future[None]] = deque()

    def put_nowait(self, item: Call | None) -> None:
        self._items.append(item)
        if self._waiters:
            self._wake()

    def _wake(self) -> None:
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def empty(self) -> bool:
        return not self._items

    def get_nowait(self) -> Call | None:
        """The oldest item; only when the queue is not :meth:`empty`."""
        return self._items.popleft()

    async def get(self) -> Call | None:
        items = self._items
        while not items:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                waiter.cancel()
                with contextlib.suppress(ValueError):  # a put took it off already
                    self._waiters.remove(waiter)
                if items and not waiter.cancelled():
                    self._wake()  # woken and cancelled at once: pass the wake-up on
                raise
        return items.popleft()


class FanIn:
    """The requests of one run and the queue its proposers feed (see the module docstring).

    ``calls`` and ``states`` (one :class:`LayerState` per layer started) are for reading;
    ``t0`` is the run's start on ``clock``, set by :meth:`start`.
    """

    def __init__(self, spec: MoA, messages: list[ChatMessage], clock: Callable[[], float]) -> None:
        self.spec = spec
        self.messages = messages
        self.clock = clock
        self.t0 = 0.0
        self.calls: list[Call] = []
        self.states: list[LayerState] = []
        self._inbox = _Inbox()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._armed: float | None = None  # when the timer fires, if armed

    # -- starting ----------------------------------------------------------------------------
    def start(self) -> list[Event]:
        """The run starts now: its first layer's requests go out; their events."""
        self.t0 = self.clock()
        return self.start_layer(0, None) if self.spec.layers else []

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``coro`` in a task of the run (cancelled, at the latest, by :meth:`close`)."""
        task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        return task

    def messages_for(self, agent: Agent, refs: Sequence[Reference] | None) -> list[ChatMessage]:
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

    def record(
        self,
        agent: Agent,
        role: Literal["proposer", "aggregator"],
        layer: int,
        index: int,
        now: float,
        messages: Sequence[ChatMessage],
    ) -> Call:
        """A new request's record, kept in :attr:`calls`."""
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
        self.calls.append(call)
        return call

    def start_layer(self, li: int, refs: Sequence[Reference] | None) -> list[Event]:
        """Send layer ``li``'s requests (over ``refs``, the previous layer's); their events."""
        layer = self.spec.layers[li]
        now = self.clock()
        calls: list[Call] = []
        events: list[Event] = []
        for index, agent in enumerate(layer.agents):
            messages = self.messages_for(agent, refs)
            call = self.record(agent, "proposer", li, index, now, messages)
            calls.append(call)
            request = agent.request(messages, max_tokens=layer.max_tokens)
            call.task = self.spawn(
                _propose(call, agent, request, self._inbox.put_nowait, self.clock)
            )
            call.task.add_done_callback(functools.partial(self._proposer_task_done, call))
            events.append(ProposerStarted(li, index, agent.name, now - self.t0))
        self.states.append(
            LayerState(
                calls, layer.policy, now, usable=layer.usable, degrade=layer.on_unmet == "degrade"
            )
        )
        return events

    def _proposer_task_done(self, call: Call, task: asyncio.Task[Any]) -> None:
        """A proposer task cancelled before it first ran never entered :func:`_propose`, so
        never saw its CancelledError: record the cancellation here, whoever cancelled it."""
        if task.cancelled() and call.outcome == "running":
            call.outcome = "cancelled"
            call.ended_at = self.clock()

    # -- taking in what the proposers sent ---------------------------------------------------
    async def next_batch(self, li: int) -> list[Event]:
        """Wait for something to happen in layer ``li`` (its policy's next deadline included);
        take in everything already queued, then ask the policy once (read
        ``states[li].decision``). Returns layer ``li``'s events."""
        state = self.states[li]
        inbox = self._inbox
        self._arm_timer(state)
        item = await inbox.get()
        now = self.clock()
        events: list[Event] = []
        while True:
            if item is None:
                state.on_tick(now)
                self._armed = None
            elif item.layer == li:
                self._take(item, events, now)
            else:
                self._take(item, None, now)  # a kept straggler of an earlier layer
            if inbox.empty():
                break
            item = inbox.get_nowait()
        state.decide()
        return events

    def drain(self, li: int) -> Sequence[Event]:
        """Take in everything already queued, without waiting; layer ``li``'s events."""
        if self._inbox.empty():
            return ()
        events: list[Event] = []
        self._take_queued(self.clock(), li, events)
        return events

    async def wait(self, li: int, until: float | None) -> list[Event]:
        """Wait until a proposer sends something (or ``until``, on :attr:`clock`), then take
        in everything queued; layer ``li``'s events."""
        timeout = None if until is None else max(0.0, until - self.clock())
        try:
            async with asyncio.timeout(timeout):
                item = await self._inbox.get()
        except TimeoutError:
            return []
        events: list[Event] = []
        if item is not None:
            self._take(item, events if item.layer == li else None, self.clock())
        if not self._inbox.empty():
            self._take_queued(self.clock(), li, events)
        return events

    def absorb(self) -> None:
        """Take in whatever is still queued, without events: once no layer is waiting any more
        (for the report; before that the queue is the events' source)."""
        self._take_queued(self.clock())

    def hedge_event(self, call: Call, now: float) -> Hedged | None:
        """The ``hedge`` event of ``call``, once its race is decided (then never again)."""
        hedge = call.hedge
        if hedge is None or (hedge.winner is None and call.outcome == "running"):
            return None
        call.hedge_reported = True
        return Hedged(
            call.role,
            call.layer,
            call.index,
            call.agent,
            hedge.backup,
            hedge.after_s,
            hedge.winner,
            now - self.t0,
        )

    def _arm_timer(self, state: LayerState) -> None:
        at = state.next_check_at()
        if at == self._armed:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if at is not None:
            loop = asyncio.get_running_loop()
            when = loop.time() + max(0.0, at - self.clock())
            self._timer = loop.call_at(when, self._inbox.put_nowait, None)
        self._armed = at

    def _take_queued(
        self, now: float, li: int | None = None, events: list[Event] | None = None
    ) -> None:
        """Take in everything queued, timer ticks aside; ``events`` gets layer ``li``'s."""
        inbox = self._inbox
        while not inbox.empty():
            item = inbox.get_nowait()
            if item is not None:
                self._take(item, events if item.layer == li else None, now)

    def _take(self, call: Call, events: list[Event] | None, now: float) -> None:
        """Feed what ``call``'s task handed over to its layer's state; the events, if wanted."""
        call.queued = False
        state = self.states[call.layer]
        index = call.index
        pending = call.pending
        if events is not None and not call.hedge_reported and call.chunks == 0:
            hedged = self.hedge_event(call, now)
            if hedged is not None:
                events.append(hedged)
        if pending:
            if events is None or call.status != "running":
                for text in pending:
                    state.on_delta(index, text, now)
            else:
                t = now - self.t0
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
                ttft = (
                    None if call.first_token_at is None else call.first_token_at - call.started_at
                )
                events.append(
                    ProposerDone(
                        call.layer,
                        index,
                        call.agent,
                        call.text,
                        call.finish_reason,
                        call.usage(),
                        ttft,
                        now - self.t0,
                    )
                )
        elif outcome == "failed":
            error = call.error or "failed"
            state.on_failed(index, error, now)
            if events is not None:
                kind = _error_kind(call.exc)
                events.append(
                    ProposerFailed(call.layer, index, call.agent, error, kind, now - self.t0)
                )

    # -- ending ------------------------------------------------------------------------------
    def stop_timer(self) -> None:
        """No policy deadline to wait for any more (the layer decided, or the run ends)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._armed = None

    def settle_stragglers(self, li: int) -> None:
        """Cancel the layer's running proposers if its stragglers are ``cancel``."""
        state = self.states[li]
        if self.spec.layers[li].stragglers == "cancel":
            for index in state.cancel_running():
                task = state.calls[index].task
                if task is not None:
                    task.cancel()

    async def close(self, grace: float) -> None:
        """Give the tasks still running ``grace`` seconds to finish (``0``: none), then cancel
        every one left and wait until they have ended. Cancelling the caller during the grace
        cancels them at once."""
        try:
            if grace > 0:
                kept = [t for t in self._tasks if not t.done()]
                if kept:
                    await asyncio.wait(kept, timeout=grace)
        finally:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
