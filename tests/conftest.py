"""Suite-wide checks: every async test must leave no task of its own behind, and no test's
logging set-up reaches the next."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest
import structlog
from hypothesis import HealthCheck, settings

# pytester runs pytest inside a test: how the moa_stream pytest plugin is tested.
pytest_plugins = ["pytester"]

# No per-example deadline and no "too slow" health check: on a loaded machine a plain
# example can take seconds, which says nothing about the code under test.
settings.register_profile("moa_stream", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("moa_stream")


@pytest.fixture(autouse=True)
def _fresh_structlog() -> Iterator[None]:
    """Commands called in-process configure structlog globally; no test may see another's."""
    yield
    structlog.reset_defaults()


@pytest.fixture(autouse=True)
async def _no_leaked_tasks() -> AsyncIterator[None]:
    before = set(asyncio.all_tasks())
    yield
    current = asyncio.current_task()
    # Give just-cancelled tasks a few loop turns to unwind before judging.
    for _ in range(20):
        leaked = [
            t for t in asyncio.all_tasks() if t not in before and t is not current and not t.done()
        ]
        if not leaked:
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"tasks left pending after the test: {leaked!r}")
