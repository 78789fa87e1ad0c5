"""The integration modules' ``__all__``: every name defined, sorted."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

MODULES = [
    "moa_stream.integrations.aiohttp",
    "moa_stream.integrations.fastapi",
    "moa_stream.pytest_plugin",
    "moa_stream.tracing",
]


@pytest.mark.parametrize("module_name", MODULES)
def test_all_names_exist_and_are_sorted(module_name: str) -> None:
    module = importlib.import_module(module_name)
    names = list(module.__all__)
    assert names == sorted(names)
    missing = [n for n in names if not hasattr(module, n)]
    assert not missing


NO_FASTAPI = """
import sys
sys.modules["fastapi"] = None  # as if the extra were not installed
import moa_stream.integrations
import moa_stream.integrations.aiohttp
try:
    import moa_stream.integrations.fastapi
except ImportError as exc:
    print(exc)
"""


def test_without_fastapi_only_its_integration_fails_with_the_install_hint() -> None:
    done = subprocess.run(
        [sys.executable, "-c", NO_FASTAPI], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "pip install 'moa_stream[fastapi]'" in done.stdout
