"""The answer stream as a client of ``moa-stream serve`` sees it, on the embedded default.

``moa-stream serve`` with no config (simulated agents, no key, no network) answers the same
questions through each MoA id, one request at a time, interleaved; the client is the openai SDK,
streaming. Per MoA: time to the first content chunk, total time, the gaps between content
chunks (inter-token latency, the longest gap of each answer, gaps over 1 s) and the answer's
integrity (restarts, copied prompt markup), against ``moa-wait-all``.

    .venv/bin/python benchmarks/serve_default.py [--runs 10] [--moa staircase ...]
        [--out build/serve-default]

writes ``serve-default.json`` (every run) and ``serve-default.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from real_inference import QUESTIONS, serve_and_ask

from moa_stream.bench.integrity import answer_integrity, stream_gaps

BASELINE = "moa-wait-all"


async def measure(moas: list[str], runs: int) -> list[dict[str, Any]]:
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(runs)]
    return await serve_and_ask(None, moas, questions, request_timeout=120)


def summarize(runs: list[dict[str, Any]], moas: list[str]) -> list[dict[str, Any]]:
    rows = []
    for moa_id in moas:
        mine = [r for r in runs if r["moa"] == moa_id and not r["error"] and r["chunk_times"]]
        gaps = [
            stream_gaps(r["chunk_times"], start=0.0, end=r["total_s"]).longest or 0.0 for r in mine
        ]
        integrity = [answer_integrity(r["answer"]) for r in mine]
        rows.append(
            {
                "moa": moa_id,
                "runs": len(mine),
                "failed": sum(1 for r in runs if r["moa"] == moa_id) - len(mine),
                "ttft_p50_s": statistics.median(r["ttft_s"] for r in mine) if mine else None,
                "total_p50_s": statistics.median(r["total_s"] for r in mine) if mine else None,
                "longest_gap_p50_s": statistics.median(gaps) if gaps else None,
                "longest_gap_max_s": max(gaps) if gaps else None,
                "runs_with_gap_over_1s": sum(1 for g in gaps if g > 1.0),
                "restarts_mean": (
                    statistics.fmean(i.restarts for i in integrity) if integrity else None
                ),
                "markup_answers": sum(1 for i in integrity if i.markup),
            }
        )
    return rows


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    base = next((r for r in rows if r["moa"] == BASELINE), None)
    lines = [
        f"Measured on {meta['when']} with `{meta['command']}` ({meta['seconds']:.0f} s): "
        f"`moa-stream serve` on the embedded default (simulated agents), the openai SDK "
        f"streaming, {meta['runs']} answers per MoA, one request at a time.",
        "",
        "| MoA | runs | TTFT p50 (x wait-all) | total p50 (x wait-all) | longest gap p50 | "
        "longest gap max | answers with a gap > 1 s | restarts / answer | answers with markup |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:

        def ratio(key: str, r: dict[str, Any] = r) -> str:
            if base is None or not base[key] or r[key] is None:
                return ""
            return f" ({r[key] / base[key]:.2f}x)"

        lines.append(
            f"| {r['moa']} | {r['runs']} | {_s(r['ttft_p50_s'])}{ratio('ttft_p50_s')} | "
            f"{_s(r['total_p50_s'])}{ratio('total_p50_s')} | {_s(r['longest_gap_p50_s'])} | "
            f"{_s(r['longest_gap_max_s'])} | {r['runs_with_gap_over_1s']} | "
            f"{r['restarts_mean']:.2f} | {r['markup_answers']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="answers per MoA (default: 10)")
    parser.add_argument(
        "--moa",
        nargs="+",
        default=["staircase"],
        help=f"MoA ids of the embedded default to measure against {BASELINE} (default: staircase)",
    )
    parser.add_argument("--out", type=Path, default=Path("build/serve-default"))
    args = parser.parse_args(argv)
    moas = [BASELINE, *(m for m in args.moa if m != BASELINE)]
    started = time.monotonic()
    runs = asyncio.run(measure(moas, args.runs))
    rows = summarize(runs, moas)
    meta = {
        "when": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": ".venv/bin/python benchmarks/serve_default.py " + " ".join(sys.argv[1:]),
        "seconds": time.monotonic() - started,
        "runs": args.runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serve-default.json").write_bytes(
        orjson.dumps({"meta": meta, "summary": rows, "runs": runs}, option=orjson.OPT_INDENT_2)
    )
    text = markdown(meta, rows)
    (args.out / "serve-default.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
