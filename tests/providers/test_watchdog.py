"""The attempts' deadline timer: watchdogs sharing one loop timer."""

from __future__ import annotations

import asyncio
import time

import pytest

from moa_stream.providers._watchdog import Deadlines, Watchdog


async def test_a_shared_timer_interrupts_only_the_watchdog_whose_deadline_passed() -> None:
    deadlines = Deadlines()
    quiet = [Watchdog(deadlines) for _ in range(200)]
    for dog in quiet:
        dog.arm(time.monotonic() + 0.05)
    for dog in quiet[:150]:
        dog.close()  # their attempts ended before the deadline
    late = Watchdog(deadlines)
    late.arm(time.monotonic() + 0.02)
    start = time.monotonic()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.sleep(1)
    assert late.expired()
    assert 0.015 < time.monotonic() - start < 0.5
    late.close()
    for dog in quiet[150:]:
        dog.disarm()  # no longer waiting: their entries come due and do nothing
    await asyncio.sleep(0.06)
    assert not any(dog.expired() for dog in quiet)
    for dog in quiet[150:]:
        dog.close()
    assert deadlines._handle is None and not deadlines._heap


async def test_moving_deadlines_forward_keeps_the_heap_small() -> None:
    deadlines = Deadlines()
    dogs = [Watchdog(deadlines) for _ in range(10)]
    for i in range(2000):
        dog = dogs[i % 10]
        dog.arm(time.monotonic() + 30 - i * 1e-3)  # each a little earlier: a new entry
        dog.disarm()
    assert len(deadlines._heap) <= 10 + 2 * 64 + 2
    for dog in dogs:
        dog.close()
    assert deadlines._handle is None and not deadlines._heap


async def test_an_early_entry_is_set_again_at_the_deadline_in_force() -> None:
    dog = Watchdog()
    dog.arm(time.monotonic() + 0.01)
    dog._deadline = time.monotonic() + 0.05  # the deadline moved on (a read arrived)
    start = time.monotonic()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.sleep(1)
    assert dog.expired()
    assert time.monotonic() - start >= 0.045
    dog.close()
