"""The deadline timer of one HTTP attempt: it interrupts the attempt's wait for the network
when the deadline then in force passes, and costs no timer object per read.

The watchdogs of one connection pool share one loop timer (:class:`Deadlines`): an attempt's
deadline is an entry in a heap of plain tuples, not an asyncio ``TimerHandle`` of its own, whose
creation, heap insertion (through a Python ``__lt__``), cancellation and later removal from the
loop's heap cost every request more than all of its reads do.
"""

from __future__ import annotations

import asyncio
import heapq
import math
import time
from typing import Any, Final

__all__ = ["Deadlines", "Watchdog"]

_INF: Final = math.inf
_monotonic = time.monotonic
_current_task = asyncio.current_task
_heappush = heapq.heappush
_heappop = heapq.heappop
#: Stale entries tolerated in a :class:`Deadlines` heap before it is compacted (and at most as
#: many as live ones).
_MIN_STALE: Final = 64


class Deadlines:
    """The deadlines of many watchdogs, on one timer of the running event loop.

    Each watchdog has at most one live entry ``(when, key, watchdog)``; an entry whose key is no
    longer the watchdog's (it moved its deadline, or closed) is stale and is skipped when it
    comes up. The loop timer is set for the earliest entry; when it fires, every entry that is
    due fires its watchdog. Stale entries are dropped in bulk once they outnumber the live
    ones, so the heap stays about as large as the number of attempts in flight. Use it from one
    event loop only (a connection pool is bound to one).
    """

    __slots__ = ("_handle", "_handle_at", "_heap", "_key", "_stale")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Watchdog]] = []
        self._handle: asyncio.TimerHandle | None = None
        self._handle_at = _INF
        self._key = 0
        self._stale = 0

    def add(self, when: float, watchdog: Watchdog) -> int:
        """Fire ``watchdog`` at ``when`` (on ``time.monotonic()``); the entry's key."""
        self._key = key = self._key + 1
        _heappush(self._heap, (when, key, watchdog))
        if when < self._handle_at:
            self._arm(when)
        return key

    def drop(self) -> None:
        """One entry went stale."""
        self._stale = stale = self._stale + 1
        heap = self._heap
        if stale >= len(heap):
            # Nothing live: forget the entries, and the loop need not wake up for them.
            heap.clear()
            self._stale = 0
            if self._handle is not None:
                self._handle.cancel()
                self._handle = None
                self._handle_at = _INF
        elif stale > _MIN_STALE and 2 * stale > len(heap):
            heap[:] = [entry for entry in heap if entry[2]._key == entry[1]]
            heapq.heapify(heap)
            self._stale = 0

    def _arm(self, when: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        loop = asyncio.get_running_loop()
        self._handle = loop.call_later(max(0.0, when - _monotonic()), self._run)
        self._handle_at = when

    def _run(self) -> None:
        self._handle = None
        self._handle_at = _INF
        heap = self._heap
        now = _monotonic()
        while heap and heap[0][0] <= now:
            _, key, watchdog = _heappop(heap)
            if watchdog._key == key:
                watchdog._key = 0
                watchdog._handle_at = _INF
                watchdog._fire()
            elif self._stale > 0:
                self._stale -= 1
        # Stale entries at the top would only wake the loop for nothing.
        while heap and heap[0][2]._key != heap[0][1]:
            _heappop(heap)
            if self._stale > 0:
                self._stale -= 1
        if heap and heap[0][0] < self._handle_at:
            self._arm(heap[0][0])


class Watchdog:
    """One deadline per attempt that interrupts a wait when it passes.

    Deadlines move forward on every network read; rather than scheduling and cancelling a
    timer per read (the cost of ``asyncio.timeout``), the entry is left where it is and, when it
    fires early, set again at the deadline then in force. It is only ever armed while the owning
    task awaits the network, so it can never interrupt the caller's own work between reads.
    ``deadlines`` is the timer it shares with other watchdogs (its own when not given).
    """

    __slots__ = ("_cancelling", "_deadline", "_deadlines", "_fired", "_handle_at", "_key", "_task")

    def __init__(self, deadlines: Deadlines | None = None) -> None:
        self._deadlines = deadlines if deadlines is not None else Deadlines()
        #: the key of this watchdog's live entry in ``_deadlines`` (0: none), due at _handle_at
        self._key = 0
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
        if self._key:
            self._key = 0
            self._handle_at = _INF
            self._deadlines.drop()
        self._task = None

    def _schedule(self, deadline: float) -> None:
        deadlines = self._deadlines
        if self._key:
            self._key = 0  # before drop(): a compaction must see the old entry as stale
            self._handle_at = _INF
            deadlines.drop()
        if deadline == _INF:
            return
        self._key = deadlines.add(deadline, self)
        self._handle_at = deadline

    def _fire(self) -> None:
        """The entry came due (the :class:`Deadlines` has already forgotten it)."""
        task = self._task
        if task is None:
            return  # nobody waiting: the next wait sets a fresh entry
        if self._deadline == _INF:
            return
        remaining = self._deadline - _monotonic()
        if remaining > 0:
            self._schedule(self._deadline)
            return
        self._fired = True
        task.cancel()
