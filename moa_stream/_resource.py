"""The one base class of everything that holds connections or tasks."""

from __future__ import annotations

from types import TracebackType
from typing import Self

__all__ = ["AsyncResource"]


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
