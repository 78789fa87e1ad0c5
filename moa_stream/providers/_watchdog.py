"""The deadline timer of one HTTP attempt: it interrupts the attempt's wait for the network
when the deadline then in force passes, and costs no timer object per read."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any, Final

__all__ = ["Watchdog"]

_INF: Final = math.inf
_monotonic = time.monotonic
_current_task = asyncio.current_task


class Watchdog:
    """One timer per attempt that interrupts a wait when its deadline passes.

    Deadlines move forward on every network read; rather than creating and cancelling a timer
    per read (the cost of ``asyncio.timeout``), the handle is left where it is and, when it
    fires early, re-armed at the deadline then in force. It is only ever armed while the owning
    task awaits the network, so it can never interrupt the caller's own work between reads.
    """

    __slots__ = ("_cancelling", "_deadline", "_fired", "_handle", "_handle_at", "_task")

    def __init__(self) -> None:
        self._handle: asyncio.TimerHandle | None = None
        self._handle_at = _INF
        self._deadline = _INF
        self._task: asyncio.Task[Any] | None = None
        self._cancelling = 0
        self._fired = False

    def arm(self, deadline: float) -> None:
        """Watch the current task until :meth:`disarm`, interrupting it at ``deadline``."""
        task = _current_task()
        assert task is not None
        self._task = task
        self._cancelling = task.cancelling()
        self._deadline = deadline
        if deadline < self._handle_at:
            self._schedule(deadline)

    def tighten(self, deadline: float) -> None:
        """Bring the deadline of the current wait forward (never back)."""
        if self._task is not None and deadline < self._deadline:
            self._deadline = deadline
            if deadline < self._handle_at:
                self._schedule(deadline)

    def disarm(self) -> None:
        self._task = None

    def expired(self) -> bool:
        """After the watched wait raised: was it this watchdog that interrupted it?

        Withdraws the watchdog's cancellation request; false if someone else's cancellation is
        also pending (that one wins and must propagate).
        """
        if not self._fired:
            return False
        self._fired = False
        task = _current_task()
        assert task is not None
        return task.uncancel() <= self._cancelling

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
            self._handle_at = _INF
        self._task = None

    def _schedule(self, deadline: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        loop = asyncio.get_running_loop()
        self._handle = loop.call_later(max(0.0, deadline - _monotonic()), self._fire)
        self._handle_at = deadline

    def _fire(self) -> None:
        self._handle = None
        self._handle_at = _INF
        task = self._task
        if task is None:
            return  # nobody waiting: the next wait arms a fresh handle
        if self._deadline == _INF:
            return
        remaining = self._deadline - _monotonic()
        if remaining > 0:
            self._schedule(self._deadline)
            return
        self._fired = True
        task.cancel()
