"""The one base class of everything that holds connections or tasks, and the protocol of it
that interfaces declare."""

from __future__ import annotations

from types import TracebackType
from typing import Protocol, Self

__all__ = ["AsyncClosable", "AsyncResource"]


class AsyncResource:
    """An async context manager whose exit calls :meth:`aclose`.

    Subclasses implement ``aclose()`` (idempotent: safe to call again, and from ``__aexit__``
    after an explicit call) and may override ``__aenter__`` to acquire what they hold.
    """

    __slots__ = ()

    async def aclose(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class AsyncClosable(Protocol):
    """What an :class:`AsyncResource` offers, as a protocol: the part of an interface (a
    provider's stream, a simulator host) that says it is an async context manager with an
    idempotent ``aclose()``."""

    async def aclose(self) -> None: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...
