"""The start-up probe of ``serve``, ``chat`` and ``demo``: each unreachable provider, missing
``/v1`` and model a provider lacks is one line naming the config field to fix, found within a
bounded time; never fatal unless ``--check``. Errors met later carry the same hint."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

from moa_stream import ConnectError, ModelNotFoundError
from moa_stream._exceptions import AggregatorError
from moa_stream._probe import _served, hint_for, missing_version, probe
from moa_stream.cli import main
from moa_stream.config import loads_config
from moa_stream.sim import SimServer, default_models

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.timeout(120)


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def sim() -> AsyncIterator[SimServer]:
    async with SimServer(models=default_models(), seed=0) as server:
        yield server


@pytest.fixture
async def silent_port() -> AsyncIterator[int]:
    """A server that accepts connections and never answers."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    yield int(server.sockets[0].getsockname()[1])
    for writer in held:
        writer.close()
    server.close()
    await server.wait_closed()


def _config(sim_url: str, dead: int, silent: int) -> str:
    bare = sim_url.removesuffix("/v1")
    return f"""
[providers.up]
base_url = "{sim_url}"
[providers.nov1]
base_url = "{bare}"
[providers.down]
base_url = "http://127.0.0.1:{dead}/v1"
[providers.hangs]
base_url = "http://127.0.0.1:{silent}/v1"
[providers.sim]
kind = "sim"
[agents.good]
provider = "up"
model = "small-fast"
[agents.wrong]
provider = "up"
model = "no-such-model"
[agents.n]
provider = "nov1"
model = "medium"
[agents.d]
provider = "down"
model = "medium"
[agents.h]
provider = "hangs"
model = "medium"
[moa.m]
proposers = ["good", "wrong", "n", "d", "h"]
aggregator = "good"
"""


async def test_each_problem_is_one_line_naming_the_field(sim: SimServer, silent_port: int) -> None:
    config = loads_config(_config(sim.base_url, _dead_port(), silent_port))
    started = time.monotonic()
    problems = await probe(config, within=1.0)
    elapsed = time.monotonic() - started
    assert elapsed < 3.0, "the probe is bounded in time, and runs concurrently"
    by_provider = {p.provider: str(p) for p in problems}
    assert set(by_provider) == {"up", "nov1", "down", "hangs"}, problems
    assert "check agents.wrong.model" in by_provider["up"]
    assert "good" not in by_provider["up"]
    assert f'providers.nov1.base_url = "{sim.base_url}"' in by_provider["nov1"]
    assert "check providers.down.base_url" in by_provider["down"]
    assert (
        "no answer" in by_provider["hangs"] and "providers.hangs.base_url" in by_provider["hangs"]
    )
    assert all("\n" not in str(p) for p in problems)


async def test_a_correct_config_has_no_problem(sim: SimServer) -> None:
    config = loads_config(
        f'[providers.up]\nbase_url = "{sim.base_url}"\n'
        '[agents.a]\nprovider = "up"\nmodel = "medium"\n'
        '[moa.m]\npreset = "single"\naggregator = "a"\n'
    )
    assert await probe(config) == []


def test_llama_cpp_lists_are_not_compared_and_version_paths_are_recognised() -> None:
    llama = orjson.dumps({"data": [{"id": "model.gguf", "owned_by": "llamacpp"}]})
    assert _served(llama) is None
    assert _served(orjson.dumps({"data": [{"id": "a"}, {"id": "b"}]})) == {"a", "b"}
    assert missing_version("http://127.0.0.1:8000")
    assert missing_version("http://127.0.0.1:8000/")
    assert not missing_version("https://api.groq.com/openai/v1")
    assert not missing_version("https://api.openai.com/v1/")


def test_request_errors_get_the_same_hint() -> None:
    config = loads_config(_config("http://127.0.0.1:1/v1", 2, 3))
    refused = ConnectError("request failed before a response", provider="down", model="medium")
    assert hint_for(refused, config) == "check providers.down.base_url (http://127.0.0.1:2/v1)"
    missing = ModelNotFoundError("HTTP 404: Unknown request URL", provider="nov1", model="medium")
    wrapped = AggregatorError("every aggregator failed", errors={"n": missing})
    assert hint_for(wrapped, config) == (
        'did you mean providers.nov1.base_url = "http://127.0.0.1:1/v1"?'
    )
    unknown = ModelNotFoundError("HTTP 404: no such model", provider="up", model="no-such-model")
    assert hint_for(unknown, config) == "check agents.wrong.model"


def _dead_config(tmp_path: Path) -> Path:
    path = tmp_path / "dead.toml"
    path.write_text(
        f'[providers.down]\nbase_url = "http://127.0.0.1:{_dead_port()}/v1"\n'
        "retry = { max_attempts = 1 }\n"
        '[agents.d]\nprovider = "down"\nmodel = "m"\n'
        '[moa.m]\npreset = "single"\naggregator = "d"\n'
    )
    return path


@pytest.mark.parametrize("command", [["chat", "hi"], ["demo"], ["serve", "--port", "0"]])
def test_check_makes_a_problem_fatal_before_anything_starts(
    command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _dead_config(tmp_path)
    assert main([*command, "--check", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert f"moa-stream {command[0]}: error: provider down: cannot connect" in err
    assert "check providers.down.base_url" in err and "listening" not in err


def test_serve_warns_then_listens(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "moa_stream.cli",
            "serve",
            "--port",
            "0",
            "--config",
            str(_dead_config(tmp_path)),
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert proc.stderr is not None
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "listening on" in line:
                break
        text = "".join(lines)
        assert "moa-stream serve: warning: provider down: cannot connect" in text, text
        assert text.index("warning: provider down") < text.index("listening on")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if proc.stderr is not None:
            proc.stderr.close()
