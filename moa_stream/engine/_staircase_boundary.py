"""A staircase's step boundary (see :mod:`moa_stream.engine._staircase_run`): whether one comes
before a piece of the answer, and there the next step asked and tried under the guard, taking
over from the current step or not."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from typing import TYPE_CHECKING

import structlog

from moa_stream.engine._staircase_steps import (
    LATE,
    OpenStep,
    Rejected,
    Trial,
    step_request,
    try_step,
)
from moa_stream.engine.events import AggregatorStepRejected, Event
from moa_stream.engine.staircase import ContinuationGuard, Joiner, cut_point

if TYPE_CHECKING:
    from moa_stream.engine._staircase_readahead import ReadAhead
    from moa_stream.engine._staircase_run import StaircaseHost
    from moa_stream.engine._staircase_steps import StepPlan, Stragglers
    from moa_stream.engine.spec import Agent
    from moa_stream.providers import ProviderStream

__all__ = ["StepBoundary"]

_log = structlog.get_logger("moa_stream.staircase")


class StepBoundary:
    """One aggregator's step boundaries: :meth:`due` says whether one comes before a piece of
    the answer, :meth:`cross` asks the next step there and tries its first words. An accepted
    step takes over: it becomes the read-ahead's ``step``, the current one closed. A rejected
    one is closed and the current step goes on, as if nothing happened. Its times are those of
    the caller's stream (``ahead``)."""

    def __init__(
        self,
        host: StaircaseHost,
        agent: Agent,
        plan: StepPlan,
        ahead: ReadAhead,
        stragglers: Stragglers,
        overrides: tuple[float | None, int | None, tuple[str, ...] | None],
    ) -> None:
        self.host, self.agent, self.plan = host, agent, plan
        self.ahead, self.stragglers = ahead, stragglers
        self.overrides = overrides  # the run's temperature, max_tokens, stop
        self.clock, self.t0, self.max_pause = ahead.clock, ahead.t0, ahead.max_pause

    def due(self, step: OpenStep, text: str, waits: bool) -> bool:
        """Whether a boundary comes before ``text``: the step wrote its budget, or the answer
        waits for the references anyway, or they have all ended since this step was asked
        (its last step is due at once: what is left of the answer is written from them). The
        next step continues after the read-ahead, which the caller is given while it gets
        ready: unless the answer waits anyway, a boundary needs enough of it
        (:meth:`ReadAhead.cover`). ``waits``: the pacing holds ``text``."""

        if step.final or not self.plan.stepping:
            return False
        if step.written < step.budget and not waits and self.host.running_chunks():
            return False
        ahead = self.ahead
        if not waits and ahead.chunks < ahead.cover():
            return False  # too little read ahead to space out while the step gets ready
        return cut_point(ahead.tail(), text)

    async def cross(self, step: OpenStep, text: str, chunks: int) -> AsyncGenerator[Event, None]:
        """``text`` (``chunks`` of the current step's) is not the answer's yet: the next step
        takes over before it (the read-ahead's ``step`` is then the next one), or the current
        one goes on with it."""
        host = self.host
        ahead = self.ahead
        pause_until = ahead.pause_end()
        self.stragglers.check()
        for event in host.drain():
            yield event
        refs = host.references()
        plan = self.plan
        given_up = self.stragglers.given_up
        if not plan.wanted(refs, given_up):
            step.budget = step.written + next(plan.sizes)
            ahead.push(text, chunks, step.record)
            return
        answer = ahead.answer_text()
        request_messages, extra = plan.propose(refs, answer, given_up)
        if plan.too_long(request_messages, self.overrides[1], ahead.written()):
            plan.withdraw()
            plan.stepping = False
            _log.info("staircase.context_full", agent=self.agent.name, step=step.number + 1)
            ahead.push(text, chunks, step.record)
            return
        number = step.number + 1
        final = plan.tracker.settled(refs)
        yield plan.step_event(number, refs, final, ahead.answer_chars(), self.clock() - self.t0)
        plan.asked += 1
        prefill = answer.rstrip() if plan.continuation.method == "prefill" else None
        request = step_request(self.agent, self.overrides, ahead.written(), request_messages, extra)
        stream = self.agent.provider.stream(request)
        record = host.open_step(self.agent, number, request_messages, stream)
        joiner = Joiner()
        joiner.begin(answer, prefill, echoes=plan.continuation.echoes)
        guard = plan.guard(answer)
        trials: list[Trial] = []
        asked = self.clock()
        try:
            if ahead.pieces:
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
        ahead.step_took(self.clock() - asked)
        for event in trial.events:
            yield event
        if not trial.late:
            LATE.clear(self.agent)
        if trial.accepted:
            await step.stream.aclose()
            host.close_step(step.record, "cancelled", None, None)
            plan.accepted(answer)
            size = next(plan.sizes)
            new = OpenStep(number, stream, record, joiner, size, final, trial.written, trial.ended)
            ahead.step = new
            ahead.push(guard.held, max(1, trial.written), record)
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
        ahead.push(text, chunks, step.record)

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
        ahead = self.ahead
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
                last = ahead.last_at if ahead.last_at is not None else now
                end = last + self.max_pause
                if not ahead.pieces:
                    if now >= end:
                        break  # late
                    until = end
                else:
                    turn = ahead.turn(now)
                    if turn is None:
                        yield ahead.pop()
                        continue
                    until = turn
                waiter = asyncio.ensure_future(wait(until))
                await asyncio.wait((task, waiter), return_when=asyncio.FIRST_COMPLETED)
                if not waiter.done():
                    waiter.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await waiter
                waiter = None
                self.stragglers.check()
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
