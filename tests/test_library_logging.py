"""A program that uses the library sees nothing of its logs until it configures logging, and
never on stdout; the README's programs end their output with a newline and print readable
figures."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from moa_stream.sim import SimServer, default_models

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
async def sim() -> AsyncIterator[SimServer]:
    """The simulator with the models the README's programs name."""
    async with SimServer(models=default_models(), seed=0) as server:
        yield server


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


def _ten_lines() -> str:
    return next(b for b in _python_blocks() if "from_endpoints" in b)


def _explicit() -> str:
    return next(b for b in _python_blocks() if "mixture_of_agents(" in b)


async def _run(source: str, sim: SimServer) -> subprocess.CompletedProcess[str]:
    source = source.replace("http://127.0.0.1:8001/v1", sim.base_url)
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", source],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tempfile.gettempdir(),  # not the checkout: `python -c` imports from its directory
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


async def test_a_wrong_model_prints_no_log_line_on_stdout_or_anywhere(sim: SimServer) -> None:
    program = _ten_lines().replace('"medium"', '"no-such-model"')
    assert "no-such-model" in program
    result = await _run(program, sim)
    assert result.returncode == 0, result.stderr
    assert "provider.failed" not in result.stdout and "warning" not in result.stdout
    assert result.stderr == "", "silent until the application configures logging"
    assert result.stdout.strip()


async def test_the_warning_reaches_an_application_that_configures_logging(sim: SimServer) -> None:
    program = _ten_lines().replace('"medium"', '"no-such-model"')
    configured = "import logging\nlogging.basicConfig()\n" + program
    result = await _run(configured, sim)
    assert "WARNING:moa_stream.providers:provider.failed" in result.stderr, result.stderr
    assert "provider.failed" not in result.stdout
    # An application that configures structlog itself gets the line through its set-up.
    own = "import sys, structlog\n" + program.replace(
        "import moa_stream\n",
        "import moa_stream\n"
        "structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))\n",
    )
    result = await _run(own, sim)
    assert "provider.failed" in result.stderr and "provider.failed" not in result.stdout


async def test_readme_programs_end_with_a_newline_and_round_the_ttft(sim: SimServer) -> None:
    ten = await _run(_ten_lines(), sim)
    assert ten.returncode == 0 and ten.stdout.endswith("\n"), repr(ten.stdout[-40:])
    explicit = await _run(_explicit(), sim)
    assert explicit.returncode == 0, explicit.stderr
    assert re.search(r"\nTTFT \d+\.\d\d s; tokens \d+\n$", explicit.stdout), explicit.stdout[-80:]


def test_the_server_snippet_ends_with_a_newline() -> None:
    block = next(b for b in _python_blocks() if "from openai import OpenAI" in b)
    assert block.rstrip().endswith("print()")
