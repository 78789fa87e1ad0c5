"""Recording which upstream requests a run made, without touching the engine.

The engine's report says what each request did (timings, status, usage) but not what it sent.
The traces keep the exact requests and the upstream's request ids (which find the simulator's
record of each request, and so its schedule, for the oracle), so every agent's provider is
wrapped in a :class:`RecordingProvider` that appends each request to the :class:`CallLog` of the
run that made it. Which run that is comes from a context variable: the
benchmark sets it in the run's own task, and the engine's proposer tasks inherit it when they are
created, so concurrent runs never mix their logs.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field

from moa_stream._types import ChatRequest
from moa_stream.providers import Provider, ProviderStream

__all__ = ["CallLog", "LoggedCall", "RecordingProvider", "current_log"]


@dataclass(slots=True)
class LoggedCall:
    """One request as sent. ``stream`` is set for streamed requests (its ``timings.attempts``
    counts retries); non-streamed ones set ``attempts`` themselves."""

    request: ChatRequest
    stream: ProviderStream | None = None
    attempts: int = 1

    @property
    def model(self) -> str:
        return self.request.model

    @property
    def tries(self) -> int:
        """Requests sent for this call, retries included (at least 1)."""
        if self.stream is not None:
            return max(1, self.stream.timings.attempts)
        return max(1, self.attempts)

    @property
    def request_id(self) -> str | None:
        """The upstream's id of the (last) request, where the stream knows it: it names the
        simulator's record of the request."""
        value = getattr(self.stream, "request_id", None)
        return value if isinstance(value, str) else None


@dataclass(slots=True)
class CallLog:
    """Every request of one run, in the order they were made."""

    calls: list[LoggedCall] = field(default_factory=list)


#: The log of the run whose task (or a task it started) is running.
current_log: contextvars.ContextVar[CallLog | None] = contextvars.ContextVar(
    "moa_stream_bench_call_log", default=None
)


class RecordingProvider:
    """A :class:`~moa_stream.Provider` that passes everything to ``inner`` and logs each
    stream's request into the current run's :class:`CallLog` (if there is one)."""

    def __init__(self, inner: Provider) -> None:
        self.inner = inner

    @property
    def name(self) -> str:
        return self.inner.name

    def stream(self, request: ChatRequest) -> ProviderStream:
        stream = self.inner.stream(request)
        log = current_log.get()
        if log is not None:
            log.calls.append(LoggedCall(request, stream))
        return stream

    async def prewarm(self) -> None:
        await self.inner.prewarm()

    async def aclose(self) -> None:
        await self.inner.aclose()

    def __repr__(self) -> str:
        return f"RecordingProvider({self.inner!r})"
