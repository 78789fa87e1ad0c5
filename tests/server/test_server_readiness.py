"""``/readyz``: 503 while the server starts and from the moment it drains; ``/healthz`` stays
liveness. With ``--drain-delay``, SIGTERM turns ``/readyz`` to 503 while the listening socket
still accepts and requests are still served, so a load balancer takes the instance out before
its connections are refused."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from support.requests import CHAT, body
from support.serve_process import AUTH, serve_process, write_config
from support.server import Running, config
from support.sse import sse_items

import moa_stream.server._serve as serve_module
from moa_stream.config import Runtime
from moa_stream.server import serve


async def _get(url: str) -> tuple[int, Any, Any]:
    """A GET on a connection of its own (none kept alive to mislead the next)."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session, session.get(url) as resp:
        return resp.status, await resp.json(), resp.headers


async def test_readyz_is_ready(srv: Running) -> None:
    status, data, _ = await _get(srv.url + "/readyz")
    assert (status, data) == (200, {"status": "ready"})


async def test_draining_is_not_ready_but_alive_and_serving(srv: Running) -> None:
    srv.state.begin_drain()
    status, data, _ = await _get(srv.url + "/readyz")
    assert (status, data) == (503, {"status": "draining"})
    status, data, _ = await _get(srv.url + "/healthz")
    assert (status, data) == (200, {"status": "ok"})
    # Still served, but the connection is not kept for a next request.
    async with (
        aiohttp.ClientSession() as session,
        session.post(srv.url + CHAT, json=body("fast")) as resp,
    ):
        assert resp.status == 200
        assert resp.headers["Connection"] == "close"
        await resp.read()
    srv.state.begin_shutdown()
    assert (await _get(srv.url + "/readyz"))[:2] == (503, {"status": "draining"})


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_not_ready_while_the_runtime_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    release = asyncio.Event()

    class SlowRuntime(Runtime):
        async def start(self) -> None:
            await release.wait()
            await super().start()

    monkeypatch.setattr(serve_module, "Runtime", SlowRuntime)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    stop = asyncio.Event()
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        serve(config(), host="127.0.0.1", port=port, stop=stop, on_ready=ready.set_result)
    )
    try:
        for _ in range(200):
            with contextlib.suppress(aiohttp.ClientConnectionError):
                status, data, _ = await _get(url + "/readyz")
                break
            await asyncio.sleep(0.02)
        assert (status, data) == (503, {"status": "starting"})
        assert (await _get(url + "/healthz"))[:2] == (200, {"status": "ok"})
        status, data, headers = await _get(url + "/v1/models")
        assert status == 503 and data["error"]["code"] == "starting"
        assert headers["Retry-After"] == "1" and headers["Connection"] == "close"
        assert headers["x-should-retry"] == "true"
        assert not ready.done()
        release.set()
        assert await asyncio.wait_for(ready, 10) == url
        assert (await _get(url + "/readyz"))[:2] == (200, {"status": "ready"})
        status, data, _ = await _get(url + "/v1/models")
        assert status == 200 and data["data"]
    finally:
        release.set()
        stop.set()
        await asyncio.wait_for(task, 10)


async def test_sigterm_turns_readyz_503_before_the_listener_closes(tmp_path: Path) -> None:
    """The process as a load balancer sees it: SIGTERM mid-stream, then /readyz polled."""
    delay = 1.5
    async with (
        serve_process(write_config(tmp_path), "--drain-delay", str(delay)) as proc,
        aiohttp.ClientSession() as session,
    ):
        assert (await _get(proc.url + "/readyz"))[:2] == (200, {"status": "ready"})
        # "second": an answer of about two seconds.
        async with session.post(
            proc.url + CHAT, json=body("second", stream=True), headers=AUTH
        ) as resp:
            assert resp.status == 200
            head = await resp.content.readuntil(b'"content":"')
            proc.process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            polls: list[tuple[float, int | str]] = []
            served_while_draining = None
            while time.monotonic() - signalled < delay + 3:
                try:
                    status, data, _ = await _get(proc.url + "/readyz")
                    polls.append((time.monotonic() - signalled, status))
                    if status == 503 and served_while_draining is None:
                        assert data == {"status": "draining"}
                        async with session.post(
                            proc.url + CHAT, json=body("single"), headers=AUTH
                        ) as other:
                            served_while_draining = other.status
                            await other.read()
                except aiohttp.ClientConnectionError:
                    polls.append((time.monotonic() - signalled, "refused"))
                    break
                await asyncio.sleep(0.05)
            rest = await resp.content.read()
        outcomes = [outcome for _, outcome in polls]
        # Not ready at once, for as long as the delay, while connections are still accepted;
        # only then refused.
        assert outcomes[-1] == "refused", polls
        assert 503 in outcomes and 200 not in outcomes[outcomes.index(503) :], polls
        first_503 = next(t for t, outcome in polls if outcome == 503)
        last_503 = max(t for t, outcome in polls if outcome == 503)
        assert first_503 < 1.0 and last_503 >= delay - 0.5, polls
        assert served_while_draining == 200
        # The stream that was running when the signal came ends as usual.
        data_lines = [text for kind, text in sse_items(head + rest) if kind == "data"]
        assert data_lines[-1] == "[DONE]"
        assert orjson.loads(data_lines[-2])["choices"][0]["finish_reason"] == "stop"
        assert await asyncio.wait_for(proc.process.wait(), 10) == 0
    events = [e["event"] for e in proc.logs()]
    assert events.index("server.draining") < events.index("server.stopping")
