"""Load test of ``moa-stream serve``: N concurrent streaming clients for a fixed duration.

The server runs as a subprocess on a config whose simulated models have *fixed* latency: a
fixed TTFT, a fixed decode rate and a fixed answer length, with no jitter, prefill or faults.
The simulator's schedule for one request is then known in advance. With the ``wait_all``
policy the aggregator starts when the slowest proposer has sent its last token, so::

    oracle TTFT = max over proposers (ttft + (tokens - 1) / tokens_per_s) + aggregator ttft

Everything a client waits beyond that is overhead: the server's own work (request parsing, the
engine, four upstream requests and their SSE parsing, chunk encoding), the simulator's (it runs
in the server's process unless ``--external-sim``), the network stack and the event loops.

The clients run in this process (aiohttp on uvloop), each in a loop: send a streaming request,
time the first content byte, read to ``[DONE]``, repeat. Their starts are spread over one
request's duration, so the server sees a steady load rather than bursts of N requests. The
server is pinned to CPU 0 and the clients to CPU 1 when the machine has two or more, so they do
not steal each other's time.

Reported: completed requests per second, errors by kind, p50/p99 TTFT and TTFT overhead over
the oracle, and the server's peak RSS (``VmHWM`` in ``/proc/<pid>/status``, summed over its
worker processes) and CPU use.

    .venv/bin/python benchmarks/server_load.py --clients 64 --duration 60
    .venv/bin/python benchmarks/server_load.py --clients 256 --duration 60 --json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

# The fixed schedule: (name, ttft s, tokens/s, answer tokens).
PROPOSERS = [("p1", 0.20, 80.0, 32), ("p2", 0.30, 80.0, 32), ("p3", 0.40, 80.0, 32)]
AGGREGATOR = ("agg", 0.25, 80.0, 48)
PROMPT = "Explain in a few sentences why the sky is blue."
MODEL = "bench"


def oracle_ttft() -> float:
    """The TTFT the simulator's schedule alone would give, in seconds."""
    slowest = max(ttft + (n - 1) / tps for _, ttft, tps, n in PROPOSERS)
    return slowest + AGGREGATOR[1]


def oracle_total() -> float:
    """When the last answer token is due, in seconds after the request."""
    _, _, tps, n = AGGREGATOR
    return oracle_ttft() + (n - 1) / tps


def sim_models_toml(prefix: str) -> str:
    lines = []
    for name, ttft, tps, n in [*PROPOSERS, AGGREGATOR]:
        lines += [
            f"[{prefix}models.{name}]",
            f"ttft = {ttft}",
            f"tokens_per_s = {tps}",
            f"answer_tokens = {n}",
            "",
        ]
    return "\n".join(lines)


def server_toml(upstream: str | None, max_streams: int) -> str:
    """The server's config: the simulator in-process, or an external one at ``upstream``."""
    provider = (
        '[providers.sim]\nkind = "sim"\n'
        if upstream is None
        else f'[providers.sim]\nbase_url = "{upstream}"\n'
    )
    # Every agent request holds a pooled connection while it streams: four per client.
    provider += f"max_connections = {max_streams * 4}\n"
    provider += "timeouts = { connect = 10, first_token = 60, idle = 60, total = 300 }\n"
    provider += "retry = { max_attempts = 1 }\n\n"
    agents = "".join(
        f'[agents.{name}]\nprovider = "sim"\nmodel = "{name}"\n\n'
        for name, *_ in [*PROPOSERS, AGGREGATOR]
    )
    proposers = ", ".join(f'"{name}"' for name, *_ in PROPOSERS)
    moa = (
        f"[moa.{MODEL}]\nproposers = [{proposers}]\n"
        f'aggregator = "{AGGREGATOR[0]}"\npolicy = "wait_all"\n\n'
    )
    server = f"[server]\nmax_concurrent_streams = {max_streams}\nshutdown_grace = 5\n\n"
    sim = "[sim]\nseed = 0\n\n" + sim_models_toml("sim.") if upstream is None else ""
    return provider + agents + moa + server + sim


# -- processes ----------------------------------------------------------------------------------


def _pin(pid: int, cpu: int) -> None:
    with contextlib.suppress(AttributeError, OSError):
        if cpu < (os.cpu_count() or 1):
            os.sched_setaffinity(pid, {cpu})


def _wait_for_line(path: Path, needle: str, proc: subprocess.Popen[bytes], within: float) -> str:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}:\n{path.read_text()}")
        for line in path.read_text().splitlines():
            if needle in line:
                return line
        time.sleep(0.05)
    raise RuntimeError(f"no {needle!r} within {within} s:\n{path.read_text()}")


@dataclass
class Servers:
    url: str
    server: subprocess.Popen[bytes]
    sim: subprocess.Popen[bytes] | None = None


@contextlib.contextmanager
def start_servers(
    workdir: Path, *, workers: int, external_sim: bool, pin: bool, max_streams: int
) -> Any:
    python = sys.executable
    sim_proc = None
    upstream = None
    if external_sim:
        sim_file = workdir / "sim.toml"
        sim_file.write_text("seed = 0\ninclude_defaults = false\n\n" + sim_models_toml(""))
        sim_out = workdir / "sim.out"
        with sim_out.open("wb") as out:
            sim_proc = subprocess.Popen(
                [python, "-m", "moa_stream.cli", "sim", "--port", "0", "--config", str(sim_file)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        line = _wait_for_line(sim_out, " at http", sim_proc, 30)
        upstream = line.rsplit(" at ", 1)[1].strip()
        if pin:
            _pin(sim_proc.pid, 1)
    config = workdir / "server.toml"
    config.write_text(server_toml(upstream, max_streams))
    log = workdir / "server.log"
    with log.open("wb") as err:
        server = subprocess.Popen(
            [
                python,
                "-m",
                "moa_stream.cli",
                "serve",
                "--config",
                str(config),
                "--port",
                "0",
                "--workers",
                str(workers),
            ],
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    try:
        line = _wait_for_line(log, '"server.listening"', server, 30)
        url = orjson.loads(line)["url"]
        if pin:
            for pid in _process_tree(server.pid):
                _pin(pid, 0)
        yield Servers(url, server, sim_proc)
    finally:
        for proc in (server, sim_proc):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def _process_tree(pid: int) -> list[int]:
    pids = [pid]
    with contextlib.suppress(OSError):
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        for child in children:
            pids += _process_tree(int(child))
    return pids


def _status_kb(pid: int, key: str) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def _cpu_seconds(pid: int) -> float:
    with contextlib.suppress(OSError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        # utime and stime are fields 14 and 15 of stat; 12 and 13 after the command name.
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0


# -- clients ------------------------------------------------------------------------------------


@dataclass
class Results:
    ttfts: list[float] = field(default_factory=list)
    totals: list[float] = field(default_factory=list)
    completed: int = 0
    errors: Counter[str] = field(default_factory=Counter)


async def client_loop(
    session: aiohttp.ClientSession,
    url: str,
    stop_at: float,
    measure_from: float,
    results: Results,
    delay: float,
) -> None:
    payload = orjson.dumps(
        {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": PROMPT}]}
    )
    headers = {"Content-Type": "application/json"}
    # Staggered starts: with a fixed schedule, clients that start together stay in lockstep
    # and the server would see bursts of N requests instead of a steady load.
    await asyncio.sleep(delay)
    while time.monotonic() < stop_at:
        started = time.monotonic()
        measured = started >= measure_from
        try:
            async with session.post(url, data=payload, headers=headers) as resp:
                if resp.status != 200:
                    await resp.read()
                    if measured:
                        results.errors[f"http_{resp.status}"] += 1
                    continue
                first_at = None
                body = bytearray()
                async for piece in resp.content.iter_any():
                    if first_at is None and b'"content":"' in piece:
                        # The server writes the role chunk and the first token together.
                        first_at = time.monotonic()
                    body += piece
                done_at = time.monotonic()
        except (aiohttp.ClientError, OSError) as exc:
            if measured:
                results.errors[type(exc).__name__] += 1
            await asyncio.sleep(0.05)
            continue
        if not measured:
            continue
        tail = bytes(body[-400:])
        if b'"error"' in tail or not tail.endswith(b"data: [DONE]\n\n") or first_at is None:
            results.errors["error_frame_or_truncated"] += 1
            continue
        results.completed += 1
        results.ttfts.append(first_at - started)
        results.totals.append(done_at - started)


async def run_clients(url: str, clients: int, duration: float, warmup: float) -> Results:
    results = Results()
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.monotonic()
        stop_at = start + warmup + duration
        tasks = [
            asyncio.create_task(
                client_loop(
                    session,
                    url + "/v1/chat/completions",
                    stop_at,
                    start + warmup,
                    results,
                    i * oracle_total() / clients,
                )
            )
            for i in range(clients)
        ]
        await asyncio.gather(*tasks)
    return results


async def scrape_active(url: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(url + "/metrics") as resp:
        text = await resp.text()
    return next(
        (line for line in text.splitlines() if line.startswith("moa_stream_active_streams ")),
        "",
    )


# -- report -------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=64, help="concurrent streaming clients")
    parser.add_argument("--duration", type=float, default=60.0, help="measured seconds")
    parser.add_argument(
        "--warmup",
        type=float,
        default=3.0,
        help="unmeasured seconds first, while the clients' staggered starts ramp the load up",
    )
    parser.add_argument("--workers", type=int, default=1, help="server processes (--workers)")
    parser.add_argument(
        "--external-sim",
        action="store_true",
        help="run the simulator as its own process instead of inside the server",
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    pin = not args.no_pin and (os.cpu_count() or 1) >= 2
    if pin:
        _pin(os.getpid(), 1)
    try:
        import uvloop

        loop_factory: Any = uvloop.new_event_loop
    except ImportError:  # pragma: no cover
        loop_factory = None

    with (
        tempfile.TemporaryDirectory() as tmp,
        start_servers(
            Path(tmp),
            workers=args.workers,
            external_sim=args.external_sim,
            pin=pin,
            max_streams=max(1024, args.clients * 2),
        ) as servers,
    ):
        pids = _process_tree(servers.server.pid)
        cpu_before = sum(_cpu_seconds(p) for p in pids)
        wall_before = time.monotonic()
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            results = runner.run(run_clients(servers.url, args.clients, args.duration, args.warmup))
            active_after = runner.run(scrape_active(servers.url))
        wall = time.monotonic() - wall_before
        pids = _process_tree(servers.server.pid)
        cpu = sum(_cpu_seconds(p) for p in pids) - cpu_before
        peak_rss_kb = sum(_status_kb(p, "VmHWM") for p in pids)

    oracle = oracle_ttft()
    overheads = [t - oracle for t in results.ttfts]
    total_overheads = [t - oracle_total() for t in results.totals]
    report = {
        "clients": args.clients,
        "duration_s": args.duration,
        "workers": args.workers,
        "external_sim": args.external_sim,
        "completed": results.completed,
        "requests_per_s": results.completed / args.duration,
        "errors": dict(results.errors),
        "oracle_ttft_s": oracle,
        "ttft_p50_s": percentile(results.ttfts, 50),
        "ttft_p99_s": percentile(results.ttfts, 99),
        "ttft_overhead_p50_ms": 1000 * percentile(overheads, 50),
        "ttft_overhead_p99_ms": 1000 * percentile(overheads, 99),
        "total_overhead_p50_ms": 1000 * percentile(total_overheads, 50),
        "total_overhead_p99_ms": 1000 * percentile(total_overheads, 99),
        "ttft_mean_s": statistics.fmean(results.ttfts) if results.ttfts else float("nan"),
        "server_peak_rss_mb": peak_rss_kb / 1024,
        "server_cpu_percent": 100 * cpu / wall,
        "active_streams_after": active_after,
    }
    if args.json:
        sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    errors = ", ".join(f"{k}={v}" for k, v in sorted(results.errors.items())) or "none"
    where = "external" if args.external_sim else "in-process"
    sys.stdout.write(
        f"moa-stream serve: {args.clients} streaming clients for {args.duration:g} s "
        f"({args.workers} worker(s), simulator {where})\n"
        f"  completed      {results.completed} requests, {report['requests_per_s']:.1f} req/s\n"
        f"  errors         {errors}\n"
        f"  oracle TTFT    {oracle * 1000:.1f} ms (schedule of the simulated models)\n"
        f"  TTFT           p50 {report['ttft_p50_s'] * 1000:.1f} ms, "
        f"p99 {report['ttft_p99_s'] * 1000:.1f} ms\n"
        f"  TTFT overhead  p50 {report['ttft_overhead_p50_ms']:.1f} ms, "
        f"p99 {report['ttft_overhead_p99_ms']:.1f} ms\n"
        f"  end overhead   p50 {report['total_overhead_p50_ms']:.1f} ms, "
        f"p99 {report['total_overhead_p99_ms']:.1f} ms (last token vs. schedule)\n"
        f"  server         peak RSS {report['server_peak_rss_mb']:.1f} MiB, "
        f"CPU {report['server_cpu_percent']:.0f}% of one core\n"
        f"  after the run  {active_after}\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
