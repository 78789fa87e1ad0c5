"""The provider protocol: what the engine needs from any LLM backend."""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import TracebackType
from typing import Literal, Protocol, Self, runtime_checkable

from moa_stream._types import ChatRequest, Delta, StreamTimings, Usage

__all__ = ["Continuation", "Provider", "ProviderStream"]

#: How an answer that stopped part-way can be continued on a provider. ``"prefill"``: send the
#: partial answer as the last, assistant, message and the model continues it (Anthropic,
#: llama.cpp's llama-server, vLLM with ``continue_final_message``). ``"append"``: the partial
#: answer becomes a finished assistant turn and a new user turn asks for the rest (works with
#: every chat API). Providers say which they support in a ``continuation`` attribute; one
#: without it is taken to support ``"append"`` only.
Continuation = Literal["append", "prefill"]


@runtime_checkable
class ProviderStream(Protocol):
    """One streamed completion.

    Used as ``async with provider.stream(request) as s: async for delta in s: ...``. The request
    is sent on ``__aenter__`` (or on the first ``__anext__`` when the stream is iterated
    without ``async with``). Leaving the block early, or ``aclose()``, releases the connection;
    ``aclose()`` is idempotent. Iteration raises only :class:`moa_stream.ProviderError`
    subclasses (and ``CancelledError``).

    After the stream ends, ``finish_reason``, ``usage`` and ``timings`` describe it.
    """

    @property
    def finish_reason(self) -> str | None: ...

    @property
    def usage(self) -> Usage | None: ...

    @property
    def timings(self) -> StreamTimings: ...

    def __aiter__(self) -> AsyncIterator[Delta]: ...

    async def __anext__(self) -> Delta: ...

    async def aclose(self) -> None: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


@runtime_checkable
class Provider(Protocol):
    """A backend that streams chat completions.

    ``name`` identifies it in errors, logs and metrics. ``prewarm()`` opens a connection ahead of
    a request so the request pays no connection set-up (a no-op where that means nothing).
    ``aclose()`` releases every pooled connection and is idempotent.
    """

    @property
    def name(self) -> str: ...

    def stream(self, request: ChatRequest) -> ProviderStream: ...

    async def prewarm(self) -> None: ...

    async def aclose(self) -> None: ...
