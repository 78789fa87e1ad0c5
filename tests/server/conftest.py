"""Fixtures for the server tests: a running server on the fast simulated config, a client."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from srvhelpers import Running, serving


@pytest.fixture
async def srv() -> AsyncIterator[Running]:
    async with serving() as running:
        yield running


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client
