"""Running a coroutine from a command: on uvloop where it is installed."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

__all__ = ["loop_factory", "run"]

T = TypeVar("T")


def loop_factory(use_uvloop: bool = True) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory if wanted and importable, else ``None`` (asyncio's default)."""
    if not use_uvloop:
        return None
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where the platform has it
        return None
    return uvloop.new_event_loop


def run(coro: Coroutine[Any, Any, T], *, use_uvloop: bool = True) -> T:
    with asyncio.Runner(loop_factory=loop_factory(use_uvloop)) as runner:
        return runner.run(coro)
