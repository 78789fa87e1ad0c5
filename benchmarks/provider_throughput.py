"""Provider chunk throughput and first-token overhead, against a bare aiohttp + orjson reader.

Two measurements, each run for ``OpenAIProvider`` and for the leanest reader one could write by
hand (``iter_any()``, split on blank lines, ``orjson.loads`` each payload):

* throughput: a minimal server sends a pre-built stream of many small chunks as fast as the
  socket takes them; reported as chunks per second and client CPU microseconds per chunk, at
  1 and at 64 concurrent streams;
* first-token overhead: the simulated upstream (``moa_stream.sim``; a fixed-delay server if it
  is missing) answers after a fixed TTFT; reported as p50/p99 client-side TTFT and their
  difference from the bare reader's.

With ``--litellm``, a third measurement: ``LiteLLMProvider`` (through
``litellm.acompletion(stream=True)``) against ``OpenAIProvider`` on the same stream, as client CPU
microseconds per chunk; LiteLLM is slow enough that fewer chunks are used.

The servers run in a separate process pinned to another core (when there is one), and the
client is pinned to one core, so the figures are the client's own cost.

    .venv/bin/python benchmarks/provider_throughput.py [--quick] [--json] [--loop asyncio]
        [--litellm]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from moa_stream import ChatRequest
from moa_stream.providers import OpenAIProvider, RetryPolicy, Timeouts

CONTENT_TOKENS = (" the", " quick", " brown", " fox", " jumps", " over", " a", " lazy", " dog", ".")
FIXED_TTFT = 0.02  # seconds, the simulated model's time to first token


# -- the server process ----------------------------------------------------------------------


def _chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    # The shape vLLM and OpenAI send, so the per-chunk JSON cost is realistic.
    obj = {
        "id": "chatcmpl-0123456789abcdef",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": "bench",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        "usage": None,
    }
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def build_stream(n: int) -> bytes:
    """A complete event stream with ``n`` content chunks."""
    tokens = [_chunk({"content": t}) for t in CONTENT_TOKENS]
    parts = [_chunk({"role": "assistant", "content": ""})]
    parts.extend(tokens[i % len(tokens)] for i in range(n))
    parts.append(_chunk({}, "stop"))
    usage = {"prompt_tokens": 10, "completion_tokens": n, "total_tokens": n + 10}
    tail = {"id": "chatcmpl-0123456789abcdef", "object": "chat.completion.chunk", "choices": []}
    parts.append(b"data: " + orjson.dumps({**tail, "usage": usage}) + b"\n\n")
    parts.append(b"data: [DONE]\n\n")
    return b"".join(parts)


def _throughput_app() -> web.Application:
    bodies: dict[int, bytes] = {}

    async def chat(request: web.Request) -> web.StreamResponse:
        n = int(orjson.loads(await request.read()).get("max_tokens") or 1000)
        body = bodies.get(n)
        if body is None:
            body = bodies[n] = build_stream(n)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        view = memoryview(body)
        for i in range(0, len(body), 65536):
            await resp.write(view[i : i + 65536])
        await resp.write_eof()
        return resp

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": []})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    return app


def _fixed_delay_app() -> web.Application:
    """The fallback TTFT server: waits ``FIXED_TTFT`` then streams ten chunks."""
    body = build_stream(10)

    async def chat(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await asyncio.sleep(FIXED_TTFT)
        await resp.write(body)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


async def _serve() -> None:
    runner = web.AppRunner(_throughput_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    ports: dict[str, Any] = {"throughput": runner.addresses[0][1]}
    async with contextlib.AsyncExitStack() as stack:
        try:
            from moa_stream.sim import LatencyProfile, SimModel, SimServer
        except ImportError:
            ttft_runner = web.AppRunner(_fixed_delay_app(), access_log=None)
            await ttft_runner.setup()
            stack.push_async_callback(ttft_runner.cleanup)
            ttft_site = web.TCPSite(ttft_runner, "127.0.0.1", 0)
            await ttft_site.start()
            ports["ttft"] = ttft_runner.addresses[0][1]
            ports["ttft_server"] = "fixed-delay"
        else:
            model = SimModel(
                name="bench",
                latency=LatencyProfile.fixed(ttft=FIXED_TTFT, tokens_per_s=1000.0),
                answer_tokens=10,
            )
            sim = await stack.enter_async_context(SimServer([model], seed=0, records_maxlen=100))
            ports["ttft"] = sim.port
            ports["ttft_server"] = "moa_stream.sim"
        sys.stdout.write(orjson.dumps(ports).decode() + "\n")
        sys.stdout.flush()
        # Serve until the parent closes our stdin.
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await runner.cleanup()


@contextlib.contextmanager
def server_process(loop: str) -> Iterator[dict[str, Any]]:
    """Start the servers in a child process; yield their ports."""
    cmd = [sys.executable, os.path.abspath(__file__), "--serve", "--loop", loop]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError("the server process did not start")
        yield orjson.loads(line)
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- the clients -----------------------------------------------------------------------------


def _request(n: int, model: str = "bench") -> ChatRequest:
    return ChatRequest(messages=[{"role": "user", "content": "Count."}], model=model, max_tokens=n)


async def provider_stream(provider: OpenAIProvider, n: int) -> tuple[int, float | None]:
    """Content chunks read, and seconds to the first one."""
    count = 0
    start = time.monotonic()
    first: float | None = None
    async with provider.stream(_request(n)) as stream:
        async for delta in stream:
            if delta.content:
                if first is None:
                    first = time.monotonic() - start
                count += 1
    return count, first


async def bare_stream(
    session: aiohttp.ClientSession, url: str, body: bytes
) -> tuple[int, float | None]:
    """The same, the leanest way: iter_any, split on blank lines, orjson.loads."""
    count = 0
    start = time.monotonic()
    first: float | None = None
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    async with session.post(url, data=body, headers=headers) as resp:
        buf = b""
        async for piece in resp.content.iter_any():
            events = (buf + piece).split(b"\n\n")
            buf = events.pop()
            for event in events:
                if not event.startswith(b"data: "):
                    continue
                payload = event[6:]
                if payload == b"[DONE]":
                    return count, first
                choices = orjson.loads(payload)["choices"]
                if choices and choices[0]["delta"].get("content"):
                    if first is None:
                        first = time.monotonic() - start
                    count += 1
    return count, first


class Clients:
    """A provider and a bare session pointed at the same server."""

    def __init__(self, port: int, model: str) -> None:
        self.base_url = f"http://127.0.0.1:{port}/v1"
        self.model = model
        self.provider = OpenAIProvider(
            self.base_url,
            name=model,
            timeouts=Timeouts(connect=30, first_token=60, idle=60, total=None),
            retry=RetryPolicy(max_attempts=1),
            limit=256,
        )
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256),
            timeout=aiohttp.ClientTimeout(total=None),
        )

    def bare(self, n: int) -> Awaitable[tuple[int, float | None]]:
        body = orjson.dumps(
            {
                "model": self.model,
                "messages": [{"role": "user", "content": "Count."}],
                "stream": True,
                "max_tokens": n,
            }
        )
        return bare_stream(self.session, self.base_url + "/chat/completions", body)

    def ours(self, n: int) -> Awaitable[tuple[int, float | None]]:
        return provider_stream(self.provider, n)

    async def aclose(self) -> None:
        await self.provider.aclose()
        await self.session.close()


Runner = Callable[[int], Awaitable[tuple[int, float | None]]]


async def _run_concurrent(run: Runner, streams: int, per_stream: int) -> tuple[int, float, float]:
    """Chunks read, wall seconds and client CPU seconds for ``streams`` concurrent streams."""
    cpu = time.process_time()
    wall = time.perf_counter()
    results = await asyncio.gather(*(run(per_stream) for _ in range(streams)))
    wall = time.perf_counter() - wall
    cpu = time.process_time() - cpu
    chunks = sum(r[0] for r in results)
    if chunks != streams * per_stream:
        raise RuntimeError(f"read {chunks} chunks, expected {streams * per_stream}")
    return chunks, wall, cpu


async def measure_throughput(
    clients: Clients, streams: int, total: int, repeats: int
) -> dict[str, Any]:
    per_stream = total // streams
    # Warm both paths (connections, caches of the server's pre-built bodies).
    await _run_concurrent(clients.bare, streams, per_stream)
    await _run_concurrent(clients.ours, streams, per_stream)
    best: dict[str, tuple[int, float, float]] = {}
    for _ in range(repeats):
        # Alternate so that any drift of the machine hits both alike.
        for name, run in (("bare", clients.bare), ("provider", clients.ours)):
            result = await _run_concurrent(run, streams, per_stream)
            if name not in best or result[1] < best[name][1]:
                best[name] = result
    row: dict[str, Any] = {"streams": streams, "chunks": per_stream * streams}
    for name, (chunks, wall, cpu) in best.items():
        row[f"{name}_chunks_per_s"] = chunks / wall
        row[f"{name}_us_per_chunk"] = cpu / chunks * 1e6
    row["ratio"] = row["provider_chunks_per_s"] / row["bare_chunks_per_s"]
    # Per CPU-second: robust to other processes taking the client's core now and then.
    row["cpu_ratio"] = row["bare_us_per_chunk"] / row["provider_us_per_chunk"]
    return row


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def measure_ttft(clients: Clients, streams: int, rounds: int) -> dict[str, Any]:
    await _run_concurrent(clients.bare, streams, 10)
    await _run_concurrent(clients.ours, streams, 10)
    samples: dict[str, list[float]] = {"bare": [], "provider": []}
    for _ in range(rounds):
        for name, run in (("bare", clients.bare), ("provider", clients.ours)):
            results = await asyncio.gather(*(run(10) for _ in range(streams)))
            samples[name].extend(r[1] for r in results if r[1] is not None)
    row: dict[str, Any] = {"streams": streams, "samples": len(samples["provider"])}
    for name, values in samples.items():
        row[f"{name}_p50_ms"] = statistics.median(values) * 1e3
        row[f"{name}_p99_ms"] = _pct(values, 0.99) * 1e3
    row["overhead_p50_ms"] = row["provider_p50_ms"] - row["bare_p50_ms"]
    row["overhead_p99_ms"] = row["provider_p99_ms"] - row["bare_p99_ms"]
    return row


async def measure_litellm(
    clients: Clients, streams: int, total: int, repeats: int
) -> dict[str, Any]:
    """Client CPU per chunk: LiteLLMProvider against OpenAIProvider, same server, same stream."""
    from moa_stream.providers import LiteLLMProvider

    lite = LiteLLMProvider(
        name="litellm",
        api_base=clients.base_url,
        api_key="bench",
        timeouts=Timeouts(connect=30, first_token=60, idle=60, total=None),
        retry=RetryPolicy(max_attempts=1),
    )

    async def through_litellm(n: int) -> tuple[int, float | None]:
        count = 0
        start = time.monotonic()
        first: float | None = None
        req = ChatRequest(
            messages=[{"role": "user", "content": "Count."}], model="openai/bench", max_tokens=n
        )
        async with lite.stream(req) as stream:
            async for delta in stream:
                if delta.content:
                    if first is None:
                        first = time.monotonic() - start
                    count += 1
        return count, first

    per_stream = total // streams
    try:
        await _run_concurrent(through_litellm, streams, per_stream)
        await _run_concurrent(clients.ours, streams, per_stream)
        best: dict[str, tuple[int, float, float]] = {}
        for _ in range(repeats):
            for name, run in (("provider", clients.ours), ("litellm", through_litellm)):
                result = await _run_concurrent(run, streams, per_stream)
                if name not in best or result[2] < best[name][2]:
                    best[name] = result
    finally:
        await lite.aclose()
    row: dict[str, Any] = {"streams": streams, "chunks": per_stream * streams}
    for name, (chunks, wall, cpu) in best.items():
        row[f"{name}_chunks_per_s"] = chunks / wall
        row[f"{name}_us_per_chunk"] = cpu / chunks * 1e6
    row["litellm_cost_ratio"] = row["litellm_us_per_chunk"] / row["provider_us_per_chunk"]
    return row


async def run_benchmarks(
    ports: dict[str, Any], quick: bool, litellm: bool = False
) -> dict[str, Any]:
    total = 50_000 if quick else 200_000
    repeats = 2 if quick else 5
    rounds = 10 if quick else 50
    results: dict[str, Any] = {"throughput": [], "ttft": [], "ttft_server": ports["ttft_server"]}
    clients = Clients(ports["throughput"], "bench")
    try:
        for streams in (1, 64):
            results["throughput"].append(await measure_throughput(clients, streams, total, repeats))
        if litellm:
            lite_total = 2_000 if quick else 10_000
            results["litellm"] = [
                await measure_litellm(clients, streams, lite_total, repeats) for streams in (1, 16)
            ]
    finally:
        await clients.aclose()
    clients = Clients(ports["ttft"], "bench")
    try:
        for streams in (1, 64):
            results["ttft"].append(await measure_ttft(clients, streams, rounds))
    finally:
        await clients.aclose()
    return results


def print_litellm(rows: list[dict[str, Any]]) -> None:
    print("\nLiteLLM: client CPU µs per chunk on the same stream (lower is better)")
    print(f"{'streams':>7} {'chunks':>8} {'provider µs':>12} {'litellm µs':>11} {'ratio':>7}")
    for row in rows:
        print(
            f"{row['streams']:>7} {row['chunks']:>8} {row['provider_us_per_chunk']:>12.2f} "
            f"{row['litellm_us_per_chunk']:>11.2f} {row['litellm_cost_ratio']:>7.1f}"
        )


def print_table(results: dict[str, Any], loop: str) -> None:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"event loop: {loop}; client pinned to one core; server in another process; "
        f"load average {load:.2f}\n"
    )
    print("throughput: chunks/s of wall time, and client CPU µs per chunk (higher/lower is better)")
    header = (
        f"{'streams':>7} {'chunks':>8} {'bare/s':>10} {'provider/s':>11} {'ratio':>6} "
        f"{'bare µs':>8} {'provider µs':>12} {'cpu ratio':>10}"
    )
    print(header)
    for row in results["throughput"]:
        print(
            f"{row['streams']:>7} {row['chunks']:>8} {row['bare_chunks_per_s']:>10,.0f} "
            f"{row['provider_chunks_per_s']:>11,.0f} {row['ratio']:>6.2f} "
            f"{row['bare_us_per_chunk']:>8.2f} {row['provider_us_per_chunk']:>12.2f} "
            f"{row['cpu_ratio']:>10.2f}"
        )
    print(
        f"\nfirst-token time, server TTFT {FIXED_TTFT * 1e3:.0f} ms ({results['ttft_server']}), "
        "milliseconds"
    )
    print(
        f"{'streams':>7} {'samples':>8} {'bare p50':>9} {'bare p99':>9} {'prov p50':>9} "
        f"{'prov p99':>9} {'Δp50':>7} {'Δp99':>7}"
    )
    for row in results["ttft"]:
        print(
            f"{row['streams']:>7} {row['samples']:>8} {row['bare_p50_ms']:>9.2f} "
            f"{row['bare_p99_ms']:>9.2f} {row['provider_p50_ms']:>9.2f} "
            f"{row['provider_p99_ms']:>9.2f} {row['overhead_p50_ms']:>7.2f} "
            f"{row['overhead_p99_ms']:>7.2f}"
        )


def _pin(cpu_index: int) -> None:
    with contextlib.suppress(AttributeError, OSError):
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) > 1:
            os.sched_setaffinity(0, {cpus[cpu_index]})


def _run(coro: Any, loop: str) -> Any:
    factory = None
    if loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer chunks and rounds")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument(
        "--litellm", action="store_true", help="also measure LiteLLMProvider's per-chunk cost"
    )
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        _pin(-1)
        _run(_serve(), args.loop)
        return 0
    with server_process(args.loop) as ports:
        _pin(0)
        results = _run(run_benchmarks(ports, args.quick, args.litellm), args.loop)
    results["loop"] = args.loop
    if args.json:
        print(orjson.dumps(results, option=orjson.OPT_INDENT_2).decode())
    else:
        print_table(results, args.loop)
        if "litellm" in results:
            print_litellm(results["litellm"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
