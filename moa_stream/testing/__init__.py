"""Test seams for code that uses moa_stream.

:class:`ScriptedProvider` is a :class:`~moa_stream.Provider` whose streams follow a script (a
time to first token, tokens at an interval, an optional failure), with counters of what was
opened and closed, so an application can test its handling of a MoA run without a network. For
tests over real HTTP, run the simulated upstream (:class:`moa_stream.sim.SimServer`) instead.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Self

from moa_stream._exceptions import ProviderError
from moa_stream._resource import AsyncResource
from moa_stream._types import ChatRequest, Delta, StreamTimings, Usage
from moa_stream.engine.events import Event
from moa_stream.engine.run import MoARun

__all__ = ["Script", "ScriptedProvider", "ScriptedStream", "collect_events"]


@dataclass(frozen=True, slots=True)
class Script:
    """What one stream does: wait ``ttft`` seconds, then yield ``tokens`` one every
    ``interval`` seconds (and ``stall`` seconds more before the token at ``stall_at``, if set);
    if ``error`` is set, raise it after ``fail_after`` tokens (``None``: after all of them)."""

    tokens: Sequence[str] = ("Hello", " world", ".")
    ttft: float = 0.0
    interval: float = 0.0
    error: ProviderError | None = None
    fail_after: int | None = None
    finish_reason: str = "stop"
    stall_at: int | None = None
    stall: float = 0.0


@dataclass
class ScriptedProvider:
    """A provider that plays :class:`Script` objects, chosen by the request's model name.

    ``requests`` records every request; ``opened``/``closed`` count streams, so a test can check
    that every stream it started was closed.
    """

    scripts: Mapping[str, Script]
    name: str = "scripted"
    requests: list[ChatRequest] = field(default_factory=list)
    opened: int = 0
    closed: int = 0
    prewarmed: int = 0

    def stream(self, request: ChatRequest) -> ScriptedStream:
        self.requests.append(request)
        try:
            script = self.scripts[request.model]
        except KeyError:
            raise KeyError(f"no script for model {request.model!r}") from None
        return ScriptedStream(self, script)

    async def prewarm(self) -> None:
        self.prewarmed += 1

    async def aclose(self) -> None:
        return None

    @property
    def open_streams(self) -> int:
        return self.opened - self.closed


class ScriptedStream(AsyncResource):
    """The stream a :class:`ScriptedProvider` returns."""

    def __init__(self, provider: ScriptedProvider, script: Script) -> None:
        self._provider = provider
        self._script = script
        self._gen: AsyncGenerator[Delta, None] | None = None
        self._closed = False
        self._timings = StreamTimings(started=time.monotonic())
        self.finish_reason: str | None = None
        self.usage: Usage | None = None

    @property
    def timings(self) -> StreamTimings:
        return self._timings

    async def __aenter__(self) -> Self:
        self._open()
        return self

    def _open(self) -> AsyncIterator[Delta]:
        if self._gen is None:
            self._provider.opened += 1
            self._gen = self._play()
        return self._gen

    def __aiter__(self) -> AsyncIterator[Delta]:
        return self

    async def __anext__(self) -> Delta:
        return await self._open().__anext__()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._gen is not None:
            self._provider.closed += 1
            await self._gen.aclose()

    async def _play(self) -> AsyncGenerator[Delta, None]:
        s = self._script
        if s.ttft:
            await asyncio.sleep(s.ttft)
        for i, token in enumerate(s.tokens):
            if s.error is not None and s.fail_after is not None and i >= s.fail_after:
                raise s.error
            if i and s.interval:
                await asyncio.sleep(s.interval)
            if i == s.stall_at:
                await asyncio.sleep(s.stall)
            now = time.monotonic()
            if self._timings.first_token is None:
                self._timings.first_token = now
            self._timings.chunk_times.append(now)
            yield Delta(content=token)
        if s.error is not None:
            raise s.error
        self.finish_reason = s.finish_reason
        self.usage = Usage(10, len(s.tokens))
        self._timings.end = time.monotonic()
        yield Delta(finish_reason=s.finish_reason, usage=self.usage)


async def collect_events(run: MoARun) -> list[Event]:
    """Every event of ``run`` (entered and closed here), in order."""
    async with run:
        return [event async for event in run.events()]
