"""The provider protocol: what the engine needs from any LLM backend."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

from moa_stream._exceptions import ConfigError
from moa_stream._resource import AsyncClosable
from moa_stream._types import ChatRequest, Delta, StreamTimings, Usage

__all__ = ["Provider", "ProviderStream", "check_continuation"]


def check_continuation(methods: tuple[str, ...]) -> tuple[str, ...]:
    """``methods`` if each names a way to continue an answer, else :class:`ConfigError`.

    A provider's ``continuation`` attribute lists, in the staircase's notation, how an answer
    that stopped part-way can be continued on it: ``"turns"`` (a new turn asks for the rest;
    every chat API can) and ``"prefill:<flavour>"`` (the partial answer is sent as the last,
    assistant, message and the model continues it: ``vllm`` with ``continue_final_message``,
    ``llama`` for llama.cpp's llama-server, ``prefix`` for DeepSeek and Mistral, ``anthropic``).
    A provider without the attribute is taken to support ``("turns",)``.
    """
    if not methods:
        raise ConfigError("name at least one method", path="continuation")
    for method in methods:
        name, _, flavour = method.partition(":")
        if not (method == "turns" or (name == "prefill" and flavour)):
            raise ConfigError(
                f"must be 'turns' or 'prefill:<flavour>', got {method!r}", path="continuation"
            )
    return methods


@runtime_checkable
class ProviderStream(AsyncClosable, Protocol):
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
