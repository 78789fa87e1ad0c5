"""Every ``# file:`` example of docs/integrations.md runs as the page says it does."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType

import aiohttp
import openai
import pytest
from aiohttp.test_utils import TestClient, TestServer
from support.asgi import uvicorn_serving
from support.integrations import INNER
from support.sse import sse_text

from moa_stream.config import Runtime, default_config

DOC = Path(__file__).resolve().parents[2] / "docs" / "integrations.md"
BLOCK = re.compile(r"```python\n# file: (\S+)\n(.*?)```", re.DOTALL)


def examples() -> dict[str, str]:
    return {name: f"# file: {name}\n{code}" for name, code in BLOCK.findall(DOC.read_text())}


def load(tmp_path: Path, name: str) -> ModuleType:
    path = tmp_path / name
    path.write_text(examples()[name])
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_page_has_every_example() -> None:
    assert set(examples()) == {
        "example_fastapi.py",
        "example_aiohttp.py",
        "test_example_plugin.py",
        "example_tracing.py",
    }


async def ask_openai(base_url: str) -> str:
    async with openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0) as sdk:
        models = [m.id for m in (await sdk.models.list()).data]
        assert "moa-quorum" in models and "single" in models
        stream = await sdk.chat.completions.create(
            model="single",
            messages=[{"role": "user", "content": "Why is the sky blue?"}],
            stream=True,
            max_tokens=5,
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])


async def test_fastapi_example(tmp_path: Path) -> None:
    module = load(tmp_path, "example_fastapi.py")
    async with uvicorn_serving(module.app, lifespan="on") as url:
        assert await ask_openai(url + "/moa/v1")
        async with aiohttp.ClientSession() as session:
            async with session.get(url + "/") as resp:
                assert await resp.json() == {"hello": "world"}
            async with session.post(url + "/ask", json={"question": "Why?"}) as resp:
                assert resp.status == 200
                assert sse_text(await resp.read())


@pytest.fixture
async def runtime() -> AsyncIterator[Runtime]:
    async with Runtime(default_config()) as rt:
        yield rt


async def test_aiohttp_example(tmp_path: Path, runtime: Runtime) -> None:
    module = load(tmp_path, "example_aiohttp.py")
    async with TestClient(TestServer(module.build_app(runtime))) as client:
        assert await ask_openai(str(client.make_url("/moa/v1")))
        resp = await client.get("/")
        assert await resp.json() == {"hello": "world"}
        body = {"model": "single", "messages": [{"role": "user", "content": "Hi"}]}
        resp = await client.post("/ask", json=body)
        assert resp.status == 200
        assert sse_text(await resp.read())


def test_pytest_example(pytester: pytest.Pytester) -> None:
    pytester.makeini(
        "[pytest]\nasyncio_mode = auto\nasyncio_default_fixture_loop_scope = function\n"
        "filterwarnings = error\n"
    )
    pytester.makepyfile(test_example_plugin=examples()["test_example_plugin.py"])
    result = pytester.runpytest(*INNER)
    result.assert_outcomes(passed=2)


def test_tracing_example(tmp_path: Path) -> None:
    path = tmp_path / "example_tracing.py"
    path.write_text(examples()["example_tracing.py"])
    done = subprocess.run(
        [sys.executable, str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].strip()  # the answer
    names = [line.split()[0] for line in lines[1:]]
    assert names[0] == "moa.run"
    assert "moa.layer" in names
    assert names.count("chat") >= 3  # proposers and the aggregator
