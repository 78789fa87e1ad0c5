"""Scale-out behind a load balancer: HAProxy in front of three ``moa-stream serve`` processes
(the embedded default config: simulated agents), health-checked on ``/readyz``, with the
HAProxy config that ``docs/deploy.md`` shows (read from the page, ports replaced).

Eight clients of the official openai SDK stream answers through HAProxy without pause while
each instance in turn is restarted as a deploy would: SIGTERM, wait for the process to exit,
start it again, wait until HAProxy has it back. The test passes when no request failed, no
stream broke (every one ended with ``finish_reason: "stop"`` and text), and every instance's
``/metrics`` counts requests: before its restart, and again after it (a restarted process
starts from zero, so the last one must have been given work once it was back).

``MOA_STREAM_SCALE_SETTLE_S`` (default 8) is how long the load runs before the first restart
and after the last; the restarts take about as long again. Each server's log goes to
``build/scale/<name>.log``, HAProxy's to ``build/scale/haproxy.log``, a summary to
``build/scale/summary.json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp
import pytest
from openai import AsyncOpenAI
from scalehelpers import haproxy_binary

pytestmark = [pytest.mark.scale, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "build" / "scale"

INSTANCES = 3
CLIENTS = 8
MODEL = "moa-quorum"
#: ``--drain-delay``: longer than HAProxy needs to see /readyz fail (fall 2 x inter 0.5 s).
DRAIN_DELAY = 2.0
SETTLE_S = float(os.environ.get("MOA_STREAM_SCALE_SETTLE_S", "8"))
START_WITHIN = 60.0

DEPLOY_DOC = ROOT / "docs" / "deploy.md"


def haproxy_config(port: int, stats_port: int, servers: list[int]) -> str:
    """The HAProxy config of docs/deploy.md, the one the page shows, on the given ports."""
    text = DEPLOY_DOC.read_text(encoding="utf-8")
    section = text[text.index("## HAProxy") :]
    block = section[section.index("```text\n") + len("```text\n") :]
    cfg = block[: block.index("```")]
    cfg = cfg.replace("127.0.0.1:8080", f"127.0.0.1:{port}")
    cfg = cfg.replace("127.0.0.1:8404", f"127.0.0.1:{stats_port}")
    for i, server_port in enumerate(servers):
        documented = f"server s{i} 127.0.0.1:{8081 + i} check"
        assert documented in cfg, documented
        cfg = cfg.replace(documented, f"server s{i} 127.0.0.1:{server_port} check")
    return cfg


def _free_ports(count: int) -> list[int]:
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for sock in socks:
            sock.close()


async def _get(url: str, within: float = 5.0) -> tuple[int, str]:
    timeout = aiohttp.ClientTimeout(total=within)
    connector = aiohttp.TCPConnector(force_close=True)
    async with (
        aiohttp.ClientSession(timeout=timeout, connector=connector) as session,
        session.get(url) as resp,
    ):
        return resp.status, await resp.text()


def requests_total(metrics_text: str) -> float:
    """The sum of every ``moa_stream_requests_total`` series of a Prometheus text."""
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith("moa_stream_requests_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


@dataclass
class Instance:
    """One ``moa-stream serve`` process on a fixed port, restartable."""

    name: str
    port: int
    log: IO[bytes]
    process: asyncio.subprocess.Process | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> float:
        """Start the process and wait for ``/readyz``; the seconds that took."""
        started = time.monotonic()
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "moa_stream.cli",
            "serve",
            "--port",
            str(self.port),
            "--no-ui",
            "--drain-delay",
            str(DRAIN_DELAY),
            "--log-format",
            "json",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=self.log,
        )
        self.starts += 1
        while time.monotonic() - started < START_WITHIN:
            assert self.process.returncode is None, f"{self.name} exited at start"
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                status, _ = await _get(self.url + "/readyz", within=2.0)
                if status == 200:
                    return time.monotonic() - started
            await asyncio.sleep(0.1)
        raise AssertionError(f"{self.name} not ready within {START_WITHIN} s")

    async def stop(self) -> tuple[int, float]:
        """SIGTERM and wait for the exit: its code and the seconds it took."""
        assert self.process is not None
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(self.process.wait(), 60)
        return code, time.monotonic() - started

    async def metrics(self) -> float:
        status, text = await _get(self.url + "/metrics")
        assert status == 200
        return requests_total(text)

    def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()


@dataclass
class Load:
    """What the clients saw."""

    ok: int = 0
    failed: list[str] = field(default_factory=list)
    broken: list[str] = field(default_factory=list)
    durations: list[float] = field(default_factory=list)


async def client(base_url: str, stop: asyncio.Event, load: Load, number: int) -> None:
    """Stream answers one after another until ``stop``; no retries, so nothing is hidden."""
    sdk = AsyncOpenAI(
        base_url=base_url,
        api_key="unused",
        max_retries=0,
        timeout=60.0,
    )
    async with sdk:
        turn = 0
        while not stop.is_set():
            turn += 1
            started = time.monotonic()
            text: list[str] = []
            finish = None
            try:
                stream = await sdk.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": f"Client {number}, question {turn}?"}],
                    stream=True,
                )
                async for chunk in stream:
                    for choice in chunk.choices:
                        if choice.delta.content:
                            text.append(choice.delta.content)
                        if choice.finish_reason:
                            finish = choice.finish_reason
            except Exception as exc:
                load.failed.append(f"client {number} turn {turn}: {type(exc).__name__}: {exc}")
                continue
            if finish != "stop" or not text:
                load.broken.append(
                    f"client {number} turn {turn}: finish_reason={finish!r}, "
                    f"{len(''.join(text))} characters"
                )
                continue
            load.ok += 1
            load.durations.append(time.monotonic() - started)


async def haproxy_status(stats_port: int) -> dict[str, str]:
    """Each server of the ``moa`` backend -> its status as HAProxy sees it (UP, DOWN ...)."""
    status, text = await _get(f"http://127.0.0.1:{stats_port}/stats;csv")
    assert status == 200
    lines = text.splitlines()
    header = lines[0].lstrip("# ").split(",")
    pxname, svname, col = header.index("pxname"), header.index("svname"), header.index("status")
    found = {}
    for line in lines[1:]:
        cells = line.split(",")
        if len(cells) > col and cells[pxname] == "moa" and cells[svname] not in ("BACKEND",):
            found[cells[svname]] = cells[col]
    return found


async def wait_status(stats_port: int, name: str, wanted: str, within: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < within:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):  # not listening yet
            if (await haproxy_status(stats_port)).get(name, "").startswith(wanted):
                return time.monotonic() - started
        await asyncio.sleep(0.1)
    raise AssertionError(f"HAProxy did not see {name} {wanted} within {within} s")


async def settle(instances: list[Instance], within: float = 60.0) -> None:
    """Let the load run :data:`SETTLE_S`, and on until every instance has answered some of it
    (a stream takes seconds: a short settle could end before any instance counts one)."""
    await asyncio.sleep(SETTLE_S)
    started = time.monotonic()
    while time.monotonic() - started < within:
        counts = [await i.metrics() for i in instances]
        if all(counts):
            return
        await asyncio.sleep(0.5)


async def _haproxy(binary: str, cfg: Path, *flags: str, **stdio: Any) -> asyncio.subprocess.Process:
    """HAProxy (``binary``) started with ``flags`` on the config file ``cfg``."""
    return await asyncio.create_subprocess_exec(binary, *flags, "-f", str(cfg), **stdio)


async def test_rolling_restart_behind_haproxy_loses_no_request() -> None:
    binary = haproxy_binary()
    assert binary is not None  # the conftest skips otherwise
    OUT.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    *ports, port, stats_port = _free_ports(INSTANCES + 2)
    logs = [(OUT / f"s{i}.log").open("wb") for i in range(INSTANCES)]
    instances = [Instance(f"s{i}", p, logs[i]) for i, p in enumerate(ports)]
    cfg = OUT / "haproxy.cfg"
    cfg.write_text(haproxy_config(port, stats_port, ports))
    check = await _haproxy(
        binary, cfg, "-c", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await check.communicate()
    assert check.returncode == 0, out.decode()
    haproxy_log = (OUT / "haproxy.log").open("wb")
    haproxy: asyncio.subprocess.Process | None = None
    load = Load()
    stop = asyncio.Event()
    clients: list[asyncio.Task[None]] = []
    summary: dict[str, Any] = {"instances": {}, "restarts": []}
    try:
        await asyncio.gather(*(i.start() for i in instances))
        haproxy = await _haproxy(
            binary,
            cfg,
            "-db",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=haproxy_log,
            stderr=haproxy_log,
        )
        for i in instances:
            await wait_status(stats_port, i.name, "UP", 30)
        base_url = f"http://127.0.0.1:{port}/v1"
        load_began = time.monotonic()
        clients = [asyncio.create_task(client(base_url, stop, load, n)) for n in range(CLIENTS)]
        await settle(instances)
        for inst in instances:
            before = await inst.metrics()
            # HAProxy's view, from the signal on: out of the pool before the socket closes.
            down = asyncio.create_task(wait_status(stats_port, inst.name, "DOWN", 30))
            code, stopped_s = await inst.stop()
            down_s = await down
            assert code == 0, f"{inst.name} exited {code}"
            started_s = await inst.start()
            up_s = await wait_status(stats_port, inst.name, "UP", 30)
            summary["restarts"].append(
                {
                    "instance": inst.name,
                    "requests_before": before,
                    "down_in_haproxy_s": round(down_s, 2),
                    "stop_s": round(stopped_s, 2),
                    "start_s": round(started_s, 2),
                    "up_in_haproxy_s": round(up_s, 2),
                    "failed_so_far": len(load.failed) + len(load.broken),
                }
            )
        await settle(instances)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*clients), 120)
        load_s = time.monotonic() - load_began
        after = {i.name: await i.metrics() for i in instances}
    finally:
        stop.set()
        for task in clients:
            task.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
        if haproxy is not None and haproxy.returncode is None:
            haproxy.terminate()
            await haproxy.wait()
        for i in instances:
            if i.process is not None and i.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    i.process.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(i.process.wait(), 15)
                except TimeoutError:
                    i.kill()
                    await i.process.wait()
        haproxy_log.close()
        for log in logs:
            log.close()
    summary.update(
        {
            "clients": CLIENTS,
            "model": MODEL,
            "load_s": round(load_s, 1),
            "test_s": round(time.monotonic() - began, 1),
            "streams_ok": load.ok,
            "failed": load.failed,
            "broken": load.broken,
            "median_stream_s": round(sorted(load.durations)[len(load.durations) // 2], 2)
            if load.durations
            else None,
        }
    )
    summary["instances"] = {name: {"requests_after_restart": n} for name, n in after.items()}
    (OUT / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    assert not load.failed, load.failed[:10]
    assert not load.broken, load.broken[:10]
    assert load.ok >= CLIENTS, "the clients streamed almost nothing"
    for restart in summary["restarts"]:
        assert restart["requests_before"] > 0, f"{restart['instance']} served nothing before"
        assert restart["down_in_haproxy_s"] < DRAIN_DELAY, (
            f"HAProxy took {restart['instance']} out only after its socket closed"
        )
    for name, n in after.items():
        assert n > 0, f"{name} served nothing after its restart"
