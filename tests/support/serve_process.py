"""``moa-stream serve`` as a child process on a temporary config, for the server's CLI tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from support.server import CONFIG

KEY = "sk-cli-test-5a9b3c"

# An aggregator whose answer takes about two seconds: long enough to send SIGTERM mid-stream
# even on a loaded machine.
EXTRA = """
[sim.models.agg-second]
ttft = 0.01
tokens_per_s = 25
answer_tokens = 50

[agents.agg-second]
provider = "sim"
model = "agg-second"

[moa.second]
proposers = ["a"]
aggregator = "agg-second"
"""


@dataclass
class Proc:
    process: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)
    listening: list[dict[str, Any]] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return str(self.listening[0]["url"])

    def logs(self) -> list[dict[str, Any]]:
        return [orjson.loads(line) for line in self.lines if line.startswith("{")]

    async def announcements(self, count: int = 1) -> list[str]:
        """The human lines saying where the server listens (they follow the JSON one)."""
        for _ in range(500):
            found = [line for line in self.lines if line.startswith("moa-stream serve: listen")]
            if len(found) >= count:
                return found
            await asyncio.sleep(0.01)
        return found


async def _read(proc: Proc, ready: asyncio.Event, workers: int) -> None:
    assert proc.process.stderr is not None
    async for raw in proc.process.stderr:
        line = raw.decode().rstrip("\n")
        proc.lines.append(line)
        with contextlib.suppress(orjson.JSONDecodeError):
            entry = orjson.loads(line)
            if isinstance(entry, dict) and entry.get("event") == "server.listening":
                proc.listening.append(entry)
                if len(proc.listening) == workers:
                    ready.set()
    ready.set()


@contextlib.asynccontextmanager
async def serve_process(
    config_path: Path | None, *args: str, workers: int = 1, env: dict[str, str] | None = None
) -> AsyncIterator[Proc]:
    argv = [sys.executable, "-m", "moa_stream.cli", "serve", "--port", "0", *args]
    if config_path is not None:
        argv += ["--config", str(config_path)]
    if workers > 1:
        argv += ["--workers", str(workers)]
    env = {**os.environ, "MOA_CLI_TEST_KEYS": KEY, **(env or {})}
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=env
    )
    proc = Proc(process)
    ready = asyncio.Event()
    proc.reader = asyncio.create_task(_read(proc, ready, workers))
    try:
        async with asyncio.timeout(20):
            await ready.wait()
        assert len(proc.listening) == workers, "\n".join(proc.lines)
        yield proc
    finally:
        # Workers run in a session of their own: a failed test must not leave them behind.
        # They go first: they hold the supervisor's stderr, and asyncio's wait() for the
        # supervisor returns only once that pipe is closed.
        for entry in proc.listening:
            if entry["pid"] != process.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(entry["pid"], signal.SIGKILL)
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
        await proc.reader


def write_config(tmp_path: Path, server: str = "") -> Path:
    path = tmp_path / "moa.toml"
    path.write_text(CONFIG + EXTRA + "\n[server]\napi_keys_env = 'MOA_CLI_TEST_KEYS'\n" + server)
    return path


AUTH = {"Authorization": f"Bearer {KEY}"}
