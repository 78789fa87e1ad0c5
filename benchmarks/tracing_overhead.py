"""What tracing adds per streamed chunk: one scripted stream of many deltas, read bare and
read through :class:`moa_stream.tracing.TracedProvider` (OpenTelemetry SDK tracer with an
in-memory exporter). The scripted stream does no I/O, so the difference is the wrapper alone.

    .venv/bin/python benchmarks/tracing_overhead.py [--chunks N] [--repeat R]

Prints the best of ``R`` runs of each, in nanoseconds per chunk.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from moa_stream import ChatRequest, Provider
from moa_stream.testing import Script, ScriptedProvider
from moa_stream.tracing import TracedProvider


async def read_all(provider: Provider) -> float:
    """CPU seconds of this process to read one whole stream of ``provider`` (CPU time, not
    wall time: on a shared machine, time spent preempted would swamp the difference)."""
    request = ChatRequest(messages=[{"role": "user", "content": "x"}], model="m")
    started = time.process_time()
    async with provider.stream(request) as stream:
        async for _ in stream:
            pass
    return time.process_time() - started


async def main(chunks: int, repeat: int) -> None:
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
    inner = ScriptedProvider({"m": Script(tokens=("tok",) * chunks)})
    traced = TracedProvider(inner, tracer=tracer_provider.get_tracer("benchmark"))
    bare_s, traced_s = [], []
    await read_all(inner)  # warm up both paths
    await read_all(traced)
    gc.disable()  # a collection inside one run and not the other would swamp the difference
    try:
        for _ in range(repeat):
            bare_s.append(await read_all(inner))
            traced_s.append(await read_all(traced))
    finally:
        gc.enable()
    bare, wrapped = min(bare_s) / chunks * 1e9, min(traced_s) / chunks * 1e9
    print(f"bare:   {bare:7.0f} ns/chunk")
    print(f"traced: {wrapped:7.0f} ns/chunk")
    print(f"added:  {wrapped - bare:7.0f} ns/chunk")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    asyncio.run(main(args.chunks, args.repeat))
