"""Stream wrappers the run puts around an agent's requests: per-agent timeouts and hedging.

Both are :class:`~moa_stream.providers.ProviderStream` objects wrapping other streams, so the
run reads them like any stream; :func:`open_stream` applies what an
:class:`~moa_stream.engine.spec.Agent` asks for, and returns the provider's own stream untouched
when it asks for nothing (no cost on the common path).

**Hedged requests** (Dean and Barroso, "The Tail at Scale", CACM 2013): when a request has not
produced its first delta within a threshold, the same request is sent to a backup (another
agent, or the same one again on another connection); whichever streams first is used and the
other is closed. The threshold is fixed (``after``) or a percentile of the agent's recent times
to first delta (``percentile``, once ``min_samples`` are known; ``after`` until then). A budget
caps the extra load: at most ``budget`` hedges per request sent (0.1: 10% more requests).
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Self

from moa_stream._exceptions import ConfigError, FirstTokenTimeout, TotalTimeout
from moa_stream._resource import AsyncResource
from moa_stream._types import ChatRequest, Delta, StreamTimings, Usage
from moa_stream.engine.events import HedgeInfo

if TYPE_CHECKING:
    from moa_stream.engine.spec import Agent
    from moa_stream.providers import ProviderStream

__all__ = ["Hedge", "HedgeInfo", "HedgedStream", "StreamWrapper", "TimedStream", "open_stream"]


class _HedgeBook:
    """The mutable side of a :class:`Hedge`: recent times to first delta, and the budget."""

    __slots__ = ("hedges", "requests", "ttfts")

    def __init__(self, window: int) -> None:
        self.ttfts: deque[float] = deque(maxlen=window)
        self.requests = 0
        self.hedges = 0


@dataclass(frozen=True, slots=True)
class Hedge:
    """When and where to send a second copy of a slow request. See the module docstring.

    ``backup``: the agent that gets the copy (its provider and model; the request is otherwise
    the same), or ``None`` for the same agent again. ``after``: seconds without a first delta
    before hedging; ``percentile``: hedge after this percentile (0-100) of the agent's last
    ``window`` times to first delta, once ``min_samples`` are known (``after`` until then, no
    hedge if ``after`` is ``None``). ``budget``: hedges allowed per request sent.

    One ``Hedge`` keeps its own statistics and budget: share it to share them.
    """

    backup: Agent | None = None
    after: float | None = None
    percentile: float | None = None
    budget: float = 0.1
    min_samples: int = 20
    window: int = 200
    _book: _HedgeBook = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.after is None and self.percentile is None:
            raise ConfigError("Hedge needs after (seconds) or percentile")
        if self.after is not None and not self.after >= 0:
            raise ConfigError("Hedge(after) must be >= 0")
        if self.percentile is not None and not 0 < self.percentile < 100:
            raise ConfigError("Hedge(percentile) must be between 0 and 100")
        if not 0 <= self.budget <= 1:
            raise ConfigError("Hedge(budget) must be between 0 and 1")
        if self.min_samples < 1 or self.window < self.min_samples:
            raise ConfigError("Hedge needs 1 <= min_samples <= window")
        object.__setattr__(self, "_book", _HedgeBook(self.window))

    def threshold(self) -> float | None:
        """Seconds without a first delta after which a request is hedged now."""
        samples = self._book.ttfts
        if self.percentile is not None and len(samples) >= self.min_samples:
            ordered = sorted(samples)
            rank = min(len(ordered) - 1, int(len(ordered) * self.percentile / 100))
            return ordered[rank]
        return self.after

    def _take_budget(self) -> bool:
        book = self._book
        if book.hedges + 1 > self.budget * book.requests:
            return False
        book.hedges += 1
        return True

    @property
    def requests(self) -> int:
        """Requests sent through this hedge so far."""
        return self._book.requests

    @property
    def hedges(self) -> int:
        """Hedges sent so far."""
        return self._book.hedges


class StreamWrapper(AsyncResource):
    """A provider stream around another that reports the inner stream's figures (finish
    reason, usage, timings, hedge) as its own and closes it on ``aclose()``. Subclasses add to
    entering and reading it (per-agent deadlines, tracing)."""

    __slots__ = ("_inner",)

    def __init__(self, inner: ProviderStream) -> None:
        self._inner = inner

    @property
    def finish_reason(self) -> str | None:
        return self._inner.finish_reason

    @property
    def usage(self) -> Usage | None:
        return self._inner.usage

    @property
    def timings(self) -> StreamTimings:
        return self._inner.timings

    @property
    def hedge(self) -> HedgeInfo | None:
        return getattr(self._inner, "hedge", None)

    @property
    def request_id(self) -> str | None:
        return getattr(self._inner, "request_id", None)

    def __aiter__(self) -> Self:
        return self

    async def aclose(self) -> None:
        await self._inner.aclose()


class TimedStream(StreamWrapper):
    """A stream with per-agent limits: no first content within ``first_token`` seconds of the
    request raises :class:`~moa_stream.FirstTokenTimeout`, a request longer than ``total``
    seconds :class:`~moa_stream.TotalTimeout` (both provider errors: the run treats them like
    any upstream failure). Costs one timer per chunk, so only agents that set a limit get it."""

    __slots__ = ("_first_dl", "_got_first", "_model", "_provider", "_total", "_total_dl")

    def __init__(
        self,
        inner: ProviderStream,
        *,
        first_token: float | None,
        total: float | None,
        provider: str,
        model: str,
    ) -> None:
        super().__init__(inner)
        self._total = total
        self._first_dl: float | None = None
        self._total_dl: float | None = None
        self._got_first = False
        self._provider = provider
        self._model = model
        if first_token is not None or total is not None:
            now = asyncio.get_running_loop().time()
            self._total_dl = None if total is None else now + total
            first = None if first_token is None else now + first_token
            if first is not None and self._total_dl is not None:
                first = min(first, self._total_dl)
            self._first_dl = first if first is not None else self._total_dl

    def _deadline(self) -> float | None:
        return self._total_dl if self._got_first else self._first_dl

    def _timeout(self) -> FirstTokenTimeout | TotalTimeout:
        if not self._got_first and self._first_dl != self._total_dl:
            return FirstTokenTimeout(
                "no first token within the agent's first_token_timeout",
                provider=self._provider,
                model=self._model,
            )
        return TotalTimeout(
            f"the request took longer than the agent's timeout ({self._total} s)",
            timeout=self._total,
            provider=self._provider,
            model=self._model,
        )

    async def __aenter__(self) -> Self:
        deadline = self._deadline()
        try:
            async with asyncio.timeout_at(deadline):
                await self._inner.__aenter__()
        except TimeoutError:
            await self._inner.aclose()
            raise self._timeout() from None
        return self

    async def __anext__(self) -> Delta:
        deadline = self._deadline()
        if deadline is None:
            delta = await self._inner.__anext__()
        else:
            try:
                async with asyncio.timeout_at(deadline):
                    delta = await self._inner.__anext__()
            except TimeoutError:
                await self._inner.aclose()
                raise self._timeout() from None
        if not self._got_first and delta.content:
            self._got_first = True
        return delta


def _won(task: asyncio.Task[Delta | None]) -> bool:
    return task.done() and not task.cancelled() and task.exception() is None


async def _first(stream: ProviderStream) -> Delta | None:
    """Send ``stream``'s request and wait for its first delta (``None``: it ended at once)."""
    await stream.__aenter__()
    try:
        return await stream.__anext__()
    except StopAsyncIteration:
        return None


class HedgedStream(AsyncResource):
    """A primary request and, if it is slow to start, a backup copy: see :class:`Hedge`.

    The race runs in two tasks owned by this stream until one copy delivers its first delta;
    from then on the winner is read directly. ``usage`` adds the loser's usage to the winner's:
    the extra request is paid for. ``hedge`` describes the hedge, if one was sent.
    """

    def __init__(
        self,
        primary: ProviderStream,
        backup_request: ChatRequest,
        backup: Agent,
        hedge: Hedge,
    ) -> None:
        self._primary = primary
        self._backup: ProviderStream | None = None
        self._backup_request = backup_request
        self._backup_agent = backup
        self._config = hedge
        self._winner: ProviderStream | None = None
        self._tasks: list[asyncio.Task[Delta | None]] = []
        self._started = 0.0
        self._ended = False
        self.hedge: HedgeInfo | None = None
        hedge._book.requests += 1

    @property
    def finish_reason(self) -> str | None:
        return (self._winner or self._primary).finish_reason

    @property
    def usage(self) -> Usage | None:
        total: Usage | None = None
        for stream in (self._primary, self._backup):
            usage = None if stream is None else stream.usage
            if usage is not None:
                total = usage if total is None else total + usage
        return total

    @property
    def timings(self) -> StreamTimings:
        return (self._winner or self._primary).timings

    @property
    def request_id(self) -> str | None:
        """The upstream's id of the copy that won (of the primary, before either did)."""
        return getattr(self._winner or self._primary, "request_id", None)

    def __aiter__(self) -> Self:
        return self

    async def __aenter__(self) -> Self:
        if not self._tasks:
            loop = asyncio.get_running_loop()
            self._started = loop.time()
            self._tasks.append(loop.create_task(_first(self._primary)))
        return self

    async def __anext__(self) -> Delta:
        winner = self._winner
        if winner is not None:
            return await winner.__anext__()
        if self._ended:
            raise StopAsyncIteration
        await self.__aenter__()
        try:
            delta = await self._race()
        except BaseException:
            await self._close_all()
            raise
        if delta is None:
            self._ended = True
            raise StopAsyncIteration
        return delta

    async def _race(self) -> Delta | None:
        loop = asyncio.get_running_loop()
        config = self._config
        primary_task = self._tasks[0]
        threshold = config.threshold()
        if threshold is not None and self._backup is None and not primary_task.done():
            wait = self._started + threshold - loop.time()
            if wait > 0:
                await asyncio.wait((primary_task,), timeout=wait)
            if not primary_task.done() and config._take_budget():
                backup = self._backup_agent.provider.stream(self._backup_request)
                self._backup = backup
                self.hedge = HedgeInfo(
                    f"{self._backup_agent.provider.name}/{self._backup_request.model}",
                    loop.time() - self._started,
                    None,
                )
                self._tasks.append(loop.create_task(_first(backup)))
        streams = (self._primary, self._backup)
        while True:
            live = [t for t in self._tasks if not t.done()]
            if live and not any(_won(t) for t in self._tasks):
                await asyncio.wait(live, return_when=asyncio.FIRST_COMPLETED)
            for i, task in enumerate(self._tasks):  # the primary wins a tie
                if _won(task):
                    winner = streams[i]
                    assert winner is not None
                    # The primary's time to first delta; when the backup won, the primary's is
                    # only known to be longer: record that bound, so the tail the hedges cut
                    # stays in the statistics instead of pulling the threshold down.
                    config._book.ttfts.append(loop.time() - self._started)
                    await self._close_losers(i)
                    self._winner = winner
                    if self.hedge is not None:
                        self.hedge = replace(self.hedge, winner="primary" if i == 0 else "backup")
                    return task.result()
            if all(t.done() for t in self._tasks):
                # Every copy failed: the primary's error is the one to report.
                first = self._tasks[0]
                error = None if first.cancelled() else first.exception()
                if error is None:
                    raise asyncio.CancelledError
                raise error

    async def _close_losers(self, winner: int) -> None:
        streams = (self._primary, self._backup)
        for i, task in enumerate(self._tasks):
            if i == winner:
                continue
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            stream = streams[i]
            if stream is not None:
                await stream.aclose()

    async def _close_all(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for stream in (self._primary, self._backup):
            if stream is not None:
                await stream.aclose()

    async def aclose(self) -> None:
        """Close both copies (and the race, if it is still on). Idempotent."""
        await self._close_all()


def open_stream(agent: Agent, request: ChatRequest) -> ProviderStream:
    """The stream for ``agent``'s ``request``, with the agent's hedge and timeouts around it."""
    stream = agent.provider.stream(request)
    hedge = agent.hedge
    if hedge is not None:
        backup = hedge.backup or agent
        backup_request = request if backup is agent else replace(request, model=backup.model)
        stream = HedgedStream(stream, backup_request, backup, hedge)
    if agent.first_token_timeout is not None or agent.timeout is not None:
        stream = TimedStream(
            stream,
            first_token=agent.first_token_timeout,
            total=agent.timeout,
            provider=agent.provider.name,
            model=agent.model,
        )
    return stream
