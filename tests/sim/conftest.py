"""Fixtures for the simulator tests: a server with a fast fixed model, and a raw HTTP client."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from moa_stream.sim import LatencyProfile, SimModel, SimServer

FAST = LatencyProfile.fixed(ttft=0.02, tokens_per_s=500)


@pytest.fixture
async def sim() -> AsyncIterator[SimServer]:
    models = [
        SimModel(name="m", latency=FAST, answer_tokens=20),
        SimModel(name="other", latency=FAST, answer_tokens=20),
    ]
    async with SimServer(models=models, seed=0, host="127.0.0.1", port=0) as server:
        yield server


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client
