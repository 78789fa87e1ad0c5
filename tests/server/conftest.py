"""Fixtures for the server tests: a running server on the fast simulated config."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from support.server import Running, serving


@pytest.fixture
async def srv() -> AsyncIterator[Running]:
    async with serving() as running:
        yield running
