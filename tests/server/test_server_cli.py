"""``moa-stream serve`` as a process: start-up, config errors, SIGTERM, several workers."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path

import aiohttp
import orjson
import pytest
from support.requests import CHAT, body
from support.serve_process import AUTH, KEY, serve_process, write_config
from support.server import CONFIG
from support.sse import sse_items


async def test_sigterm_lets_the_running_stream_finish(tmp_path: Path) -> None:
    async with serve_process(write_config(tmp_path)) as proc, aiohttp.ClientSession() as session:
        payload = body("second", stream=True)
        async with session.post(proc.url + CHAT, json=payload, headers=AUTH) as resp:
            assert resp.status == 200
            head = await resp.content.readuntil(b'"content":"')
            head += await resp.content.readuntil(b'"content":"')
            proc.process.send_signal(signal.SIGTERM)
            rest = await resp.content.read()
        items = sse_items(head + rest)
        data = [text for kind, text in items if kind == "data"]
        assert data[-1] == "[DONE]"
        finish = orjson.loads(data[-2])
        assert finish["choices"][0]["finish_reason"] == "stop"
        # The listening socket closed at the signal: new connections are refused. A session of
        # its own, so that no kept-alive connection of the stream's can be reused.
        fresh = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))
        async with fresh:
            with pytest.raises(aiohttp.ClientConnectionError):
                async with fresh.get(proc.url + "/healthz"):
                    pass
        assert await asyncio.wait_for(proc.process.wait(), 10) == 0
    events = [e["event"] for e in proc.logs()]
    assert events[0] == "server.listening"
    assert events[-3:] == ["server.stopping", "request", "server.stopped"]
    request = proc.logs()[-2]
    assert request["status"] == 200 and request["outcome"] == "ok"
    assert KEY not in "\n".join(proc.lines)


async def test_sigterm_after_the_grace_period_ends_streams_with_an_error_frame(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path, "shutdown_grace = 0.3\n")
    async with serve_process(config) as proc, aiohttp.ClientSession() as session:
        payload = body("crawl-aggregator", stream=True)
        async with session.post(proc.url + CHAT, json=payload, headers=AUTH) as resp:
            head = await resp.content.readuntil(b'"content":"')
            head += await resp.content.readuntil(b"\n\n")
            started = time.monotonic()
            proc.process.send_signal(signal.SIGTERM)
            rest = await resp.content.read()
        data = [text for kind, text in sse_items(head + rest) if kind == "data"]
        assert data[-1] == "[DONE]"
        assert orjson.loads(data[-2])["error"]["code"] == "shutting_down"
        assert await asyncio.wait_for(proc.process.wait(), 10) == 0
        assert time.monotonic() - started < 3.0
    request = next(e for e in proc.logs() if e["event"] == "request")
    assert request["outcome"] == "shutting_down"


async def test_embedded_default_config_serves(tmp_path: Path) -> None:
    async with serve_process(None) as proc, aiohttp.ClientSession() as session:
        async with session.get(proc.url + "/v1/models") as resp:
            ids = [m["id"] for m in (await resp.json())["data"]]
        assert "moa-quorum" in ids and "single" in ids
        proc.process.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.process.wait(), 10) == 0


async def test_config_errors_exit_2_naming_field_and_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(CONFIG.replace('policy = "wait_all"', 'policy = "quorum(x)"', 1))
    missing = tmp_path / "missing.toml"
    env_missing = tmp_path / "env.toml"
    env_missing.write_text(
        CONFIG.replace('kind = "sim"', 'kind = "sim"\napi_key_env = "MOA_CLI_UNSET_VARIABLE"', 1)
    )
    for path, expected in (
        (bad, "moa.fast.policy"),
        (missing, "cannot read"),
        (env_missing, "providers.sim.api_key_env"),
    ):
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "moa_stream.cli",
            "serve",
            "--port",
            "0",
            "--config",
            str(path),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await process.communicate()
        assert process.returncode == 2, err.decode()
        assert expected in err.decode()
        assert str(path) in err.decode()


async def test_workers_share_one_port(tmp_path: Path) -> None:
    async with serve_process(write_config(tmp_path), workers=2) as proc:
        urls = {entry["url"] for entry in proc.listening}
        pids = {entry["pid"] for entry in proc.listening}
        assert len(urls) == 1 and len(pids) == 2
        async with aiohttp.ClientSession() as session:
            for _ in range(4):
                sse_raw = await session.post(
                    proc.url + CHAT, json=body("single", stream=True), headers=AUTH
                )
                async with sse_raw as resp:
                    assert resp.status == 200
                    assert (await resp.read()).endswith(b"data: [DONE]\n\n")
        proc.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.process.wait(), 10) == 0
    assert sum(1 for e in proc.logs() if e["event"] == "server.stopped") == 2


async def test_serve_says_where_it_listens_once(tmp_path: Path) -> None:
    async with serve_process(write_config(tmp_path)) as proc:
        (line,) = await proc.announcements()
        assert line.startswith(f"moa-stream serve: listening on {proc.url} ")
        assert "Ctrl-C to stop" in line
    async with serve_process(write_config(tmp_path), workers=2) as proc:
        await proc.announcements()
        await asyncio.sleep(0.3)
        (line,) = await proc.announcements()
        assert proc.url in line


async def test_api_key_and_cors_origin_flags() -> None:
    origin = "https://ui.example"
    async with (
        serve_process(None, "--api-key", "sk-flag-key-1", "--cors-origin", origin) as proc,
        aiohttp.ClientSession() as session,
    ):
        async with session.get(proc.url + "/v1/models") as resp:
            assert resp.status == 401
        flag_key = {"Authorization": "Bearer sk-flag-key-1"}
        async with session.get(proc.url + "/v1/models", headers=flag_key) as resp:
            assert resp.status == 200
        preflight = {"Origin": origin, "Access-Control-Request-Method": "POST"}
        async with session.options(proc.url + CHAT, headers=preflight) as resp:
            assert resp.status == 204
            assert resp.headers["Access-Control-Allow-Origin"] == origin
    assert not any("sk-flag-key-1" in line for line in proc.lines), "the key is masked in logs"


async def test_api_key_from_the_environment_reaches_every_worker() -> None:
    env = {"MOA_STREAM_API_KEY": "sk-env-key-2"}
    async with (
        serve_process(None, env=env, workers=2) as proc,
        aiohttp.ClientSession() as session,
    ):
        for _ in range(4):  # the kernel spreads connections over both workers
            async with session.get(
                proc.url + "/v1/models", headers={"Connection": "close"}
            ) as resp:
                assert resp.status == 401
            async with session.get(
                proc.url + "/v1/models",
                headers={"Authorization": "Bearer sk-env-key-2", "Connection": "close"},
            ) as resp:
                assert resp.status == 200


async def test_a_proposer_listed_twice_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "dup.toml"
    path.write_text(CONFIG + '\n[moa.dup]\nproposers = ["a", "a"]\naggregator = "agg"\n')
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "moa_stream.cli",
        "serve",
        "--port",
        "0",
        "--config",
        str(path),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await process.communicate()
    assert process.returncode == 2, err.decode()
    assert "moa.dup.proposers" in err.decode()
    assert "Traceback" not in err.decode()


def _shared_dir(worker_pid: int) -> Path:
    """The metrics directory a worker was given by its supervisor."""
    argv = Path(f"/proc/{worker_pid}/cmdline").read_bytes().split(b"\0")
    return Path(argv[argv.index(b"--metrics-dir") + 1].decode())


def _temp_entries(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


def _requests_in(files: list[Path]) -> list[float]:
    """Chat requests in each worker's last snapshot."""
    counts = []
    for path in files:
        snapshot = orjson.loads(path.read_bytes())
        counts.append(sum(value for _, value in snapshot.get("moa_stream_requests_total", [])))
    return counts


async def test_metrics_add_up_over_workers(tmp_path: Path) -> None:
    """With two workers, any scrape reports the requests of both."""
    async with serve_process(write_config(tmp_path), workers=2) as proc:
        worker_pids = [e["pid"] for e in proc.listening]
        shared = _shared_dir(worker_pids[0])
        files = [shared / f"worker-{pid}.json" for pid in worker_pids]
        sent = 0
        headers = {**AUTH, "Connection": "close"}  # a fresh connection: either worker
        async with aiohttp.ClientSession() as session:
            for _ in range(200):
                async with session.post(
                    proc.url + CHAT, json=body("single"), headers=headers
                ) as resp:
                    assert resp.status == 200
                sent += 1
                await asyncio.sleep(1.1)  # past one flush of the snapshots
                counts = _requests_in(files)
                if all(counts):
                    break
            assert all(counts), "the kernel gave every connection to one worker"
            for _ in range(8):  # each scrape lands on either worker
                async with session.get(proc.url + "/metrics", headers=headers) as resp:
                    text = await resp.text()
                total = sum(
                    float(line.rsplit(" ", 1)[1])
                    for line in text.splitlines()
                    if line.startswith("moa_stream_requests_total{")
                )
                assert total == sent, text
        proc.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.process.wait(), 10) == 0
    assert shared.name not in _temp_entries(shared.parent), "the supervisor removes it"
