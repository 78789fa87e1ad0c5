"""The scale-out tier: HAProxy in front of several ``moa-stream serve`` processes.

Every test here is marked ``scale``. They run only when selected (``pytest -m scale``, which
is what ``make test-scale`` does, after installing Debian's ``haproxy`` package when it is
missing and apt-get can); otherwise each is skipped with the reason, before any process starts,
so ``make test`` pays nothing for them. Without an ``haproxy`` binary they are skipped too.
"""

from __future__ import annotations

import re

import pytest
from scalehelpers import haproxy_binary


def _selected(markexpr: str) -> bool:
    return bool(re.search(r"\bscale\b", markexpr)) and not re.search(r"\bnot\s+scale\b", markexpr)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    scale = [item for item in items if item.get_closest_marker("scale") is not None]
    if not scale:
        return
    reason = None
    if not _selected(config.getoption("markexpr") or ""):
        reason = "scale-out tier: selected with `pytest -m scale` (make test-scale)"
    elif haproxy_binary() is None:
        reason = (
            "scale-out tier: no haproxy binary (Debian's haproxy package; make test-scale "
            "installs it with apt-get when it can)"
        )
    if reason is not None:
        skip = pytest.mark.skip(reason=reason)
        for item in scale:
            item.add_marker(skip)
