"""What the engine costs: TTFT over the simulator's schedule, and proposer chunk throughput.

(a) Engine TTFT overhead. Three proposers and an aggregator on the simulated upstream with
*fixed* latency (a fixed TTFT, decode rate and answer length; no jitter, prefill or faults), so
the schedule of every request is known exactly: with the ``wait_all`` policy ::

    oracle TTFT = max over proposers (ttft + (tokens - 1) / tokens_per_s) + aggregator ttft

(the benchmark takes it per run from the plans in the simulator's request records, which give
the same number). Observed TTFT minus that oracle is everything the client side adds: sending
the requests, the simulator's HTTP handling, loopback TCP, SSE parsing, the engine's fan-in and
policy decision, and the aggregator's request. Measured at 1, 64 and 256 concurrent runs, on
asyncio and on uvloop. The simulator runs in another process (on uvloop), pinned to the other
core, so it does not share the client's core; the client is pinned to one core. The
simulator's own lateness (first token written after its scheduled time) is reported alongside.

(b) Proposer chunk throughput: ``OpenAIProvider`` against a bare aiohttp + orjson reader of the
same pre-built stream, at 1, 64 and 256 concurrent streams, on both loops (the server and the
two readers are those of ``benchmarks/provider_throughput.py``).

    .venv/bin/python benchmarks/overhead.py [--quick] [--json] [--engine-only]
        [--loop asyncio|uvloop]... [--level N]...
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

import provider_throughput as pt

from moa_stream.bench._cli import quiet_logs
from moa_stream.bench._recording import RecordingProvider
from moa_stream.bench._simhost import ProcessSimHost
from moa_stream.bench.oracle import RecordSchedule, run_oracle
from moa_stream.bench.quality import quiz_questions
from moa_stream.bench.report import percentile
from moa_stream.bench.runner import run_cell
from moa_stream.bench.strategies import Lineup
from moa_stream.engine import Agent, WaitAll, moa
from moa_stream.providers import OpenAIProvider, RetryPolicy, Timeouts
from moa_stream.sim import LatencyProfile, SimModel

# The fixed schedule: (name, ttft s, tokens/s, answer tokens). Real decode rates, short answers:
# 256 runs in flight then ask ~25,000 chunks/s of one client core, a load it can carry.
PROPOSERS = (("p1", 0.10, 80.0, 16), ("p2", 0.15, 80.0, 16), ("p3", 0.20, 80.0, 16))
AGGREGATOR = ("agg", 0.10, 80.0, 8)
LEVELS = (1, 64, 256)
#: Content chunks one run reads: every proposer's answer and the aggregator's.
CHUNKS_PER_RUN = sum(n for *_, n in PROPOSERS) + AGGREGATOR[3]
LOOPS = ("asyncio", "uvloop")
TARGET_P99_MS_AT_64 = 2.0


def _model(name: str, ttft: float, tps: float, tokens: int) -> SimModel:
    return SimModel(
        name=name,
        latency=LatencyProfile.fixed(ttft=ttft, tokens_per_s=tps),
        answer_tokens=tokens,
    )


MODELS = tuple(_model(*spec) for spec in (*PROPOSERS, AGGREGATOR))


def formula_oracle() -> float:
    """The oracle TTFT from the fixed profile, in seconds."""
    slowest = max(ttft + (n - 1) / tps for _, ttft, tps, n in PROPOSERS)
    return slowest + AGGREGATOR[1]


def _runs(level: int, quick: bool) -> int:
    # Enough for a p99 at every level: c=1 is one run at a time, so fewer runs but each alone.
    if level == 1:
        return 20 if quick else 40
    return level * (2 if quick else 5)


def _ramp(level: int) -> float:
    # Spread the first wave's starts over one run's length: runs of a fixed schedule all take
    # equally long, so runs started together would stay in lock-step forever and every request
    # would reach the simulator in bursts of 3 x level.
    return 0.0 if level == 1 else formula_oracle() + AGGREGATOR[3] / AGGREGATOR[2]


def client_share(trace: Any) -> tuple[float, float, float] | None:
    """The client's own time on the critical path of a wait-all run, on its own clock.

    fan-out: from the run's start until the last proposer request was written; turnaround:
    from the read that brought the slowest proposer's last chunk until the aggregator's request
    was written; hand-off: from the read that brought the aggregator's first token until the
    caller had it. What remains of the overhead is loopback TCP, process wake-ups and the
    simulator's own request handling and lateness.
    """
    t0 = trace.started_at
    proposers = [c for c in trace.calls if c.role == "proposer"]
    aggregators = [c for c in trace.calls if c.role == "aggregator"]
    if t0 is None or trace.ttft_s is None or len(aggregators) != 1:
        return None
    agg = aggregators[0]
    ends = [c.last_read_at for c in proposers]
    sent = [c.sent_at for c in proposers]
    if None in ends or None in sent or agg.sent_at is None or agg.first_read_at is None:
        return None
    fan_out = max(s for s in sent if s is not None) - t0
    turnaround = agg.sent_at - max(e for e in ends if e is not None)
    hand_off = t0 + trace.ttft_s - agg.first_read_at
    return fan_out, turnaround, hand_off


def sim_lateness(trace: Any, records: dict[str, dict[str, Any]]) -> float | None:
    """The simulator's own share of a wait-all run's overhead, in seconds: how much later than
    scheduled the last proposer answer ended, plus how much later than scheduled the
    aggregator's first token was written (both on the simulator's clock, from its records)."""
    proposers = [records.get(c.request_id) for c in trace.calls if c.role == "proposer"]
    aggregators = [records.get(c.request_id) for c in trace.calls if c.role == "aggregator"]
    if not proposers or len(aggregators) != 1:
        return None
    agg = aggregators[0]
    if agg is None or agg["first_token_sent_at"] is None or None in proposers:
        return None
    ends: list[float] = []
    due: list[float] = []
    for r in proposers:
        assert r is not None
        offsets = r["token_offsets"]
        if r["last_token_sent_at"] is None or r["scheduled_first_token_at"] is None or not offsets:
            return None
        ends.append(r["last_token_sent_at"])
        due.append(r["scheduled_first_token_at"] - offsets[0] + offsets[-1])
    first: float = agg["first_token_sent_at"] - agg["scheduled_first_token_at"]
    return max(ends) - max(due) + first


async def engine_overhead(level: int, quick: bool, host: ProcessSimHost) -> dict[str, Any]:
    """Observed TTFT minus the oracle, for ``level`` concurrent wait-all runs."""
    url = await host.start(MODELS, seed=0)
    provider = RecordingProvider(
        OpenAIProvider(
            url,
            name="sim",
            limit=4 * level + 8,
            timeouts=Timeouts(connect=30, first_token=60, idle=60, total=None),
            retry=RetryPolicy(max_attempts=1),
        )
    )
    try:
        agents = {m.name: Agent(m.name, provider, m.name) for m in MODELS}
        proposers = tuple(agents[name] for name, *_ in PROPOSERS)
        spec = moa(proposers, agents[AGGREGATOR[0]], policy=WaitAll())
        lineup = Lineup(proposers, agents[AGGREGATOR[0]], agents[AGGREGATOR[0]])
        n = _runs(level, quick)
        questions = quiz_questions(level + n)
        ramp = _ramp(level)
        # One warm-up wave opens the connections and warms the caches; it is not measured.
        await run_cell(spec, lineup, questions[:level], level, ramp_s=ramp)
        sim_cpu = await host.cpu_seconds()
        samples, wall, cpu = await run_cell(spec, lineup, questions[level:], level, ramp_s=ramp)
        sim_cpu = await host.cpu_seconds() - sim_cpu
        records = {r["request_id"]: r for r in await host.records()}
        schedule = RecordSchedule(records)
    finally:
        await provider.aclose()
        await host.stop()
    total: list[float] = []
    client: list[float] = []
    late: list[float] = []
    beyond: list[float] = []  # each run's overhead less the simulator's lateness
    parts: list[tuple[float, float, float]] = []
    for sample in samples:
        if sample.trace is None or sample.ttft_s is None:
            raise RuntimeError(f"run {sample.index} failed: {sample.error}")
        oracle = run_oracle(sample.trace, schedule)
        assert oracle is not None
        total.append(sample.ttft_s - oracle)
        lateness = sim_lateness(sample.trace, records)
        if lateness is not None:
            late.append(lateness)
            beyond.append(sample.ttft_s - oracle - lateness)
        share = client_share(sample.trace)
        if share is not None:
            parts.append(share)
            client.append(sum(share))
    ms = 1e3

    def p(values: list[float], q: float) -> float | None:
        value = percentile(values, q)
        return None if value is None else value * ms

    return {
        "runs": len(samples),
        "concurrent": level,
        "oracle_ms": formula_oracle() * ms,
        "overhead_p50_ms": p(total, 50),
        "overhead_p99_ms": p(total, 99),
        "client_p50_ms": p(client, 50),
        "client_p99_ms": p(client, 99),
        "client_max_ms": max(client) * ms if client else None,
        "fan_out_p50_ms": p([x[0] for x in parts], 50),
        "turnaround_p50_ms": p([x[1] for x in parts], 50),
        "hand_off_p50_ms": p([x[2] for x in parts], 50),
        "sim_late_p50_ms": p(late, 50),
        "sim_late_p99_ms": p(late, 99),
        "beyond_sim_p50_ms": p(beyond, 50),
        "beyond_sim_p99_ms": p(beyond, 99),
        "client_cpu_share": cpu / wall,
        # The client process's CPU time over the measured wave, per run and per content chunk
        # (4 requests and CHUNKS_PER_RUN chunks a run): what one run costs the client's core.
        "client_cpu_ms_per_run": cpu / len(samples) * ms,
        "client_cpu_us_per_chunk": cpu / (len(samples) * CHUNKS_PER_RUN) * 1e6,
        "sim_cpu_share": sim_cpu / wall,
    }


async def engine_overheads(quick: bool, levels: tuple[int, ...]) -> list[dict[str, Any]]:
    async with ProcessSimHost(cpu=_other_cpu()) as host:
        return [await engine_overhead(level, quick, host) for level in levels]


async def throughput(port: int, quick: bool, levels: tuple[int, ...]) -> list[dict[str, Any]]:
    total = 50_000 if quick else 150_000
    repeats = 2 if quick else 3
    clients = pt.Clients(port, "bench")
    try:
        return [await pt.measure_throughput(clients, s, total, repeats) for s in levels]
    finally:
        await clients.aclose()


def _cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux: no pinning
        return []


_ALL_CPUS = _cpus()


def _other_cpu() -> int | None:
    return _ALL_CPUS[-1] if len(_ALL_CPUS) > 1 else None


def _set_cpus(cpus: set[int]) -> None:
    if cpus:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, cpus)


def _run(coro: Any, loop: str) -> Any:
    factory = None
    if loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


def run_all(
    quick: bool,
    loops: tuple[str, ...] = LOOPS,
    levels: tuple[int, ...] = LEVELS,
    with_throughput: bool = True,
) -> dict[str, Any]:
    """Both measurements on every loop; the results as one JSON-ready dict."""
    started = time.monotonic()
    cpus = _cpus()
    results: dict[str, Any] = {
        "machine": {
            "cores": os.cpu_count(),
            "platform": platform.platform(terse=True),
            "python": platform.python_version(),
        },
        "pinning": "client on one core, servers on another" if len(cpus) > 1 else "none",
        "schedule": {
            "proposers": [
                dict(zip(("name", "ttft_s", "tokens_per_s", "tokens"), p, strict=False))
                for p in PROPOSERS
            ],
            "aggregator": dict(
                zip(("name", "ttft_s", "tokens_per_s", "tokens"), AGGREGATOR, strict=False)
            ),
            "oracle_ttft_ms": formula_oracle() * 1e3,
        },
        "target": f"engine TTFT overhead p99 < {TARGET_P99_MS_AT_64} ms at 64 concurrent runs",
        "engine": {},
        "throughput": {},
    }
    for loop in loops:
        # The throughput server (the same loop kind as the client, as that script runs it)
        # pins itself to the last CPU it may use: start it before the client narrows its own.
        _set_cpus(set(cpus))
        with pt.server_process(loop) as ports:
            if len(cpus) > 1:
                _set_cpus({cpus[0]})
            results["engine"][loop] = _run(engine_overheads(quick, levels), loop)
            if with_throughput:
                results["throughput"][loop] = _run(
                    throughput(ports["throughput"], quick, levels), loop
                )
    _set_cpus(set(cpus))
    results["seconds"] = round(time.monotonic() - started, 1)
    return results


def print_table(results: dict[str, Any]) -> None:
    m = results["machine"]
    print(
        f"{m['cores']} cores, {m['platform']}, Python {m['python']}; {results['pinning']}\n"
        f"oracle TTFT {results['schedule']['oracle_ttft_ms']:.1f} ms (fixed schedule, wait_all)\n"
    )
    print("(a) TTFT over the simulator's schedule, milliseconds")
    print("    all: observed TTFT minus the oracle; client: the client's own share of it;")
    print("    sim late: the simulator's own share (its last proposer token and its first")
    print("    aggregator token written after their scheduled times); all-sim: each run's")
    print("    overhead less that lateness")
    print(
        f"{'loop':<8} {'runs':>5} {'conc':>5} {'all p50':>8} {'all p99':>8} "
        f"{'client p50':>11} {'client p99':>11} {'fan-out':>8} {'turn':>6} {'hand':>6} "
        f"{'sim late p50':>12} {'p99':>6} {'all-sim p50':>11} {'p99':>6} "
        f"{'CPU client':>11} {'sim':>5} {'ms/run':>7} {'µs/chunk':>9}"
    )
    for loop, rows in results["engine"].items():
        for r in rows:
            print(
                f"{loop:<8} {r['runs']:>5} {r['concurrent']:>5} {r['overhead_p50_ms']:>8.2f} "
                f"{r['overhead_p99_ms']:>8.2f} {r['client_p50_ms']:>11.2f} "
                f"{r['client_p99_ms']:>11.2f} {r['fan_out_p50_ms']:>8.2f} "
                f"{r['turnaround_p50_ms']:>6.2f} {r['hand_off_p50_ms']:>6.2f} "
                f"{r['sim_late_p50_ms']:>12.2f} {r['sim_late_p99_ms']:>6.2f} "
                f"{r['beyond_sim_p50_ms']:>11.2f} {r['beyond_sim_p99_ms']:>6.2f} "
                f"{100 * r['client_cpu_share']:>10.0f}% {100 * r['sim_cpu_share']:>4.0f}% "
                f"{r['client_cpu_ms_per_run']:>7.2f} {r['client_cpu_us_per_chunk']:>9.1f}"
            )
    print(f"target: {results['target']}")
    print("ms/run, µs/chunk: the client process's CPU time per run and per content chunk\n")
    if not results["throughput"]:
        return
    print("(b) proposer chunk throughput: OpenAIProvider against a bare aiohttp + orjson reader")
    print(
        f"{'loop':<8} {'streams':>7} {'bare/s':>10} {'provider/s':>11} {'ratio':>6} "
        f"{'bare µs':>8} {'provider µs':>12}"
    )
    for loop, rows in results["throughput"].items():
        for r in rows:
            print(
                f"{loop:<8} {r['streams']:>7} {r['bare_chunks_per_s']:>10,.0f} "
                f"{r['provider_chunks_per_s']:>11,.0f} {r['ratio']:>6.2f} "
                f"{r['bare_us_per_chunk']:>8.2f} {r['provider_us_per_chunk']:>12.2f}"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs and chunks")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--loop", choices=LOOPS, action="append", help="only this loop")
    parser.add_argument("--level", type=int, action="append", help="only this many concurrent runs")
    parser.add_argument("--engine-only", action="store_true", help="skip (b), the chunk throughput")
    args = parser.parse_args(argv)
    quiet_logs()
    results = run_all(
        args.quick,
        tuple(args.loop or LOOPS),
        tuple(args.level or LEVELS),
        with_throughput=not args.engine_only,
    )
    if args.json:
        print(orjson.dumps(results, option=orjson.OPT_INDENT_2).decode())
    else:
        print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
