"""Every code block of README.md and docs/*.md runs as written, against the simulator.

- ``python``: run as a script in a fresh interpreter (a block with a top-level ``await`` runs as
  it would in ``python -m asyncio``). ``127.0.0.1:8001`` is the simulator (``moa-stream sim``'s
  default address) and ``127.0.0.1:8080`` the server (``moa-stream serve``'s); the test starts
  both on free ports and points the block at them.
- ``sh`` / ``console``: run with bash (``console`` blocks: the lines after ``$ ``), under the
  same address substitution, in a scratch directory whose ``.venv`` is this test's
  environment; they must print something.

Blocks run with ``LOCAL_API_KEY`` set (the simulator takes any key), as the pages that use it
ask the reader to do.
- ``toml``: a whole config is loaded with :func:`moa_stream.config.loads_config`; a fragment
  is merged into the embedded default config first, so every field it shows is checked (an
  unknown or misspelt field fails). The simulator's page shows simulator configs, loaded as
  such.
- ``json``, ``text`` and blocks without a language are sample output: not run.

A block that cannot run here (it needs a real API key, runs until stopped, or takes minutes)
is preceded by a visible line ``_Not run by the docs test: REASON._``; those are counted and
kept few.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from moa_stream import ConfigError
from moa_stream.config import loads_config, parse_config

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP_MARK = re.compile(r"^_Not run by the docs test: (.+)\._$")
RUN_LANGS = {"python", "sh", "console", "toml"}
SAMPLE_LANGS = {"", "json", "text"}
# Blocks that cannot run here: servers that run until stopped, the minutes-long benchmarks, a
# real vendor key, and the real-inference page's four (they need llama.cpp built from source).
MAX_SKIPPED = 12

RUNNER = """
import ast, asyncio, sys, types
source = open(sys.argv[1], encoding="utf-8").read()
code = compile(source, sys.argv[1], "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
scope = {"__name__": "__main__"}
if code.co_flags & 0x80:  # CO_COROUTINE: the block has a top-level await
    asyncio.run(types.FunctionType(code, scope)())
else:
    exec(code, scope)
"""


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    lang: str
    text: str
    skip: str | None

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks() -> list[Block]:
    found = []
    for path in DOCS:
        lines = path.read_text(encoding="utf-8").splitlines()
        i = 0
        while i < len(lines):
            fence = re.match(r"^(`{3,})(\S*)", lines[i])
            if not fence:
                i += 1
                continue
            start, ticks, lang = i, fence.group(1), fence.group(2)
            i += 1
            body = []
            while i < len(lines) and not lines[i].startswith(ticks):
                body.append(lines[i])
                i += 1
            i += 1
            before = next((ln for ln in reversed(lines[:start]) if ln.strip()), "")
            mark = SKIP_MARK.match(before.strip())
            skip = mark.group(1) if mark else None
            found.append(Block(path, start + 1, lang, "\n".join(body) + "\n", skip))
    return found


ALL = blocks()
RUNNABLE = [b for b in ALL if b.lang in RUN_LANGS and b.skip is None]


def test_every_block_has_a_known_language_and_few_are_skipped() -> None:
    unknown = [f"{b.id} ({b.lang})" for b in ALL if b.lang not in RUN_LANGS | SAMPLE_LANGS]
    assert not unknown, f"blocks in a language this test does not know: {unknown}"
    skipped = [b.id for b in ALL if b.skip is not None]
    assert len(skipped) <= MAX_SKIPPED, f"too many blocks not run: {skipped}"
    assert len(RUNNABLE) >= 10


# -- servers the blocks talk to ---------------------------------------------------------------


_READERS: list[threading.Thread] = []


def _spawn(args: list[str], pattern: str, stream: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "moa_stream.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    pipe = proc.stdout if stream == "stdout" else proc.stderr
    other = proc.stderr if stream == "stdout" else proc.stdout
    assert pipe is not None and other is not None
    for line in pipe:
        found = re.search(pattern, line)
        if found:
            # Keep reading both pipes, so that a chatty process never blocks on a full one.
            for rest in (pipe, other):
                reader = threading.Thread(target=rest.read, daemon=True)
                reader.start()
                _READERS.append(reader)
            return proc, found.group(1)
    proc.kill()
    proc.wait()
    raise AssertionError(f"{args} ended before printing its address")


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, str]]:
    procs: list[subprocess.Popen[str]] = []
    try:
        sim, sim_addr = _spawn(["sim", "--port", "0"], r"http://(127\.0\.0\.1:\d+)", "stdout")
        procs.append(sim)
        serve, serve_addr = _spawn(
            ["serve", "--port", "0", "--log-format", "json"],
            r"http://(127\.0\.0\.1:\d+)",
            "stderr",
        )
        procs.append(serve)
        yield {"127.0.0.1:8001": sim_addr, "127.0.0.1:8080": serve_addr}
    finally:
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for reader in _READERS:  # at the end of the pipes now that the processes are gone
            reader.join(timeout=10)
        for proc in procs:
            for pipe in (proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()


def _substitute(text: str, addresses: dict[str, str]) -> str:
    for documented, actual in addresses.items():
        text = text.replace(documented, actual)
    return text


# -- running ----------------------------------------------------------------------------------


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    venv_bin = Path(sys.executable).parent
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
        "LOCAL_API_KEY": "sk-docs-test",
    }
    return subprocess.run(
        args,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _check_toml(block: Block) -> None:
    data = tomllib.loads(block.text)
    if block.path.name == "simulator.md":
        from moa_stream.sim._config import load_sim_config

        path = ROOT / ".pytest_cache" / "docs-sim.toml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(block.text, encoding="utf-8")
        load_sim_config(path)
        return
    if "moa" in data and ("agents" in data or "providers" in data):
        loads_config(block.text, block.id)
        return
    default = (ROOT / "moa_stream" / "default.toml").read_text(encoding="utf-8")
    parse_config(_merge(tomllib.loads(default), data), block.id)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("block", RUNNABLE, ids=[b.id for b in RUNNABLE])
def test_block_runs_as_written(block: Block, servers: dict[str, str], tmp_path: Path) -> None:
    if block.lang == "toml":
        try:
            _check_toml(block)
        except (ConfigError, tomllib.TOMLDecodeError) as exc:
            pytest.fail(f"{block.id}: {exc}")
        return
    text = _substitute(block.text, servers)
    if block.lang == "python":
        script = tmp_path / "block.py"
        script.write_text(text, encoding="utf-8")
        result = _run([sys.executable, "-c", RUNNER, str(script)], cwd=tmp_path)
    else:
        if block.lang == "console":
            text = "\n".join(ln[2:] for ln in text.splitlines() if ln.startswith("$ "))
        # In a scratch directory (files a block writes stay out of the repository) whose
        # `.venv` is the environment running this test.
        (tmp_path / ".venv").symlink_to(Path(sys.executable).parent.parent)
        result = _run(["bash", "-eo", "pipefail", "-c", text], cwd=tmp_path)
        assert result.stdout.strip(), f"{block.id} printed nothing:\n{result.stderr}"
    assert result.returncode == 0, (
        f"{block.id} failed ({result.returncode}):\n{text}\n--- stdout\n{result.stdout}"
        f"\n--- stderr\n{result.stderr}"
    )
    assert "Traceback" not in result.stderr, result.stderr
