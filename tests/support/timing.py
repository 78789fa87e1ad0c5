"""Wall-clock checks that hold on a loaded machine.

A test that asserts "the simulator wrote its first token within 250 ms of its plan" fails
whenever the machine stalls this process for longer, which says nothing about the simulator.
:class:`LoopLag` measures how late the event loop itself wakes a plain ``asyncio.sleep`` over
the same span, so a bound can be stated as "no later than the loop was anyway, plus a margin".
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from types import TracebackType


class LoopLag:
    """While active, the largest delay by which the running loop woke a short sleep late.

    ``async with LoopLag() as lag: ...`` then ``lag.worst`` (seconds). A scheduler that
    serialises its streams is late by whole stream durations while the loop stays responsive,
    so a bound of ``margin + lag.worst`` still catches it.
    """

    def __init__(self, tick: float = 0.005) -> None:
        self.tick = tick
        self.worst = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _probe(self) -> None:
        while True:
            planned = time.monotonic() + self.tick
            await asyncio.sleep(self.tick)
            self.worst = max(self.worst, time.monotonic() - planned)

    async def __aenter__(self) -> LoopLag:
        self._task = asyncio.create_task(self._probe())
        await asyncio.sleep(0)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._task is not None
        # The wake-up that was due while the block ran counts too.
        planned = time.monotonic()
        await asyncio.sleep(0)
        self.worst = max(self.worst, time.monotonic() - planned)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
