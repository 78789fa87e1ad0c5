"""Fixtures for the benchmark tests: a fast simulated upstream in this process."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from benchhelpers import MODELS

from moa_stream.sim import SimServer


@pytest.fixture
async def sim() -> AsyncIterator[SimServer]:
    async with SimServer(models=list(MODELS), seed=0) as server:
        yield server
