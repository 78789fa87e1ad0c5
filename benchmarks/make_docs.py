"""Regenerate docs/benchmarks.md: the strategy matrix, the overhead benchmark, the plots.

One command (``make docs``)::

    .venv/bin/python benchmarks/make_docs.py [--quick] [--reuse]

1. waits (up to a few minutes) for the machine to be idle, since every figure is a latency and
   another process's work would land in it; the CPU load seen is written into the page;
2. runs the matrix (``moa-stream bench``: every strategy on every scenario, against the
   simulated upstream in a separate process), writing results.json, summary.md and the PNG
   plots into docs/benchmarks/;
3. runs ``benchmarks/overhead.py`` (engine TTFT overhead at 1/64/256 concurrent runs and
   provider throughput, on asyncio and uvloop), writing docs/benchmarks/overhead.json;
4. writes docs/benchmarks.md from both (the staircase against its targets first), updates the
   README's benchmark sentence from the staircase's figures, and prints the headline.

``--reuse`` rewrites the page from the JSON files already there, without measuring.
``--quick`` measures a small version (a smoke test of this script, not for publishing).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import overhead  # noqa: E402  (a sibling script, not a package)

from moa_stream import _aio  # noqa: E402
from moa_stream.bench import BenchSettings, run_bench  # noqa: E402
from moa_stream.bench._cli import quiet_logs  # noqa: E402
from moa_stream.bench.report import (  # noqa: E402
    headline_sentence,
    reduction_note,
    render_integrity_table,
    render_table,
    staircase_figures,
)
from moa_stream.bench.scenarios import SCENARIOS, get_scenarios  # noqa: E402
from moa_stream.bench.strategies import STRATEGIES  # noqa: E402

DOCS = ROOT / "docs"
OUT = DOCS / "benchmarks"
PAGE = DOCS / "benchmarks.md"
#: The real-inference section, written by benchmarks/real_inference.py (it needs real servers,
#: so this script includes its latest result instead of running it).
REAL_SECTION = OUT / "real-inference.md"

#: The docs-sized matrix: every built-in scenario with its own run count (120 runs per strategy
#: at 64 in flight, 16 one at a time), delays halved to fit the run in about ten minutes on a
#: two-core machine.
TIME_SCALE = 0.5


def cpu_busy(seconds: float = 1.0) -> float:
    """Fraction of all CPUs busy over ``seconds`` (Linux; 0 where /proc/stat is missing)."""

    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        idle = fields[3] + fields[4]
        return sum(fields), idle

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except OSError:
        return 0.0
    total = total1 - total0
    return 0.0 if total <= 0 else 1.0 - (idle1 - idle0) / total


class CpuWatch:
    """CPU time used on the whole machine, by this process and its finished children, and so
    by everything else, between :meth:`start` and :meth:`stop` (Linux)."""

    def __init__(self) -> None:
        self.wall = 0.0
        self.background_s = 0.0

    @staticmethod
    def _busy_s() -> float:
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        except OSError:
            return 0.0
        return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _mine_s() -> float:
        own = resource.getrusage(resource.RUSAGE_SELF)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime

    def __enter__(self) -> CpuWatch:
        self._t, self._busy, self._mine = time.monotonic(), self._busy_s(), self._mine_s()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.monotonic() - self._t
        busy = self._busy_s() - self._busy
        mine = self._mine_s() - self._mine
        self.background_s = max(0.0, busy - mine)

    @property
    def background_share(self) -> float:
        """Other processes' CPU use, in cores (0.5: half of one core on average)."""
        return self.background_s / self.wall if self.wall > 0 else 0.0


def wait_for_idle(limit_s: float, threshold: float = 0.15) -> float:
    """Wait until less than ``threshold`` of the CPUs are busy (at most ``limit_s``); the busy
    fraction last seen."""
    deadline = time.monotonic() + limit_s
    busy = cpu_busy()
    while busy > threshold and time.monotonic() < deadline:
        sys.stderr.write(f"make_docs: machine {100 * busy:.0f}% busy; waiting for it to idle\n")
        time.sleep(10)
        busy = cpu_busy()
    return busy


#: The scenarios where the staircase is at stake, again with an aggregator that continues its
#: answers like a small model and like a strong one (``moa_stream.sim.CONTINUATION_PROFILES``).
PROFILED = tuple(
    f"{name}@{profile}"
    for name in ("long-form", "heterogeneous")
    for profile in ("small", "strong")
)


def run_matrix(quick: bool) -> dict[str, Any]:
    scenarios = (*SCENARIOS, *PROFILED)
    command = (
        "moa-stream bench --out docs/benchmarks --time-scale "
        + str(TIME_SCALE)
        + " --scenario "
        + " ".join(scenarios)
    )
    settings = BenchSettings(
        out=OUT,
        scenarios=scenarios,
        time_scale=TIME_SCALE,
        requests=4 if quick else None,
        command=command if not quick else command + " --requests 4",
    )
    started = time.monotonic()
    output = _aio.run(run_bench(settings, sys.stderr))
    document: dict[str, Any] = orjson.loads((OUT / "results.json").read_bytes())
    document["metadata"]["seconds"] = round(time.monotonic() - started, 1)
    (OUT / "results.json").write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n")
    assert output.results
    return document


def run_overhead(quick: bool) -> dict[str, Any]:
    results = overhead.run_all(quick)
    (OUT / "overhead.json").write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2) + b"\n")
    return results


# -- the page ------------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def headline_block(matrix: dict[str, Any]) -> list[str]:
    head = matrix.get("headline")
    if head is None:
        return ["> No headline: the heterogeneous scenario or the reference MoA was not run.", ""]
    h = head
    if not h.get("quality_separates", True):
        return ["> " + headline_sentence(h), ""]
    runs = h.get("paired_runs") or h.get("runs")
    lines = [
        f"> **{100 * h['ttft_p50_reduction']:.0f}% lower TTFT p50 than the reference MoA"
        f"{reduction_note(h.get('ttft_p50_reduction_ci95'), runs)}, "
        f"{100 * (h['quality_diff'] or 0):+.1f} points of quality** (heterogeneous scenario, "
        f"simulated): {h['strategy']} (`{h['policy']}`), the fastest policy within "
        f"{100 * h['tolerance']:.0f} points of the reference MoA's quality, shows the first token "
        f"after {h['ttft_p50_s']:.2f} s at the median against {h['baseline_ttft_p50_s']:.2f} s, "
        f"and answers {_pct(h['quality'])} of the quiz correctly against "
        f"{_pct(h['baseline_quality'])}.",
        ">",
        f"> The fastest policy of all, {h['fastest_strategy']}, cuts TTFT p50 by "
        f"{100 * h['fastest_ttft_p50_reduction']:.0f}%"
        f"{reduction_note(h.get('fastest_ttft_p50_reduction_ci95'), runs)} at "
        f"{100 * (h['fastest_quality_diff'] or 0):+.1f} points.",
        "",
    ]
    if h.get("quality_within_noise"):
        caveat = headline_sentence(h).rsplit(". ", 1)[-1]
        lines[-1:-1] = [">", f"> {caveat}"]
    return lines


STAIRCASE_TARGETS = {"long-form": 0.90, "heterogeneous": 0.65}


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def staircase_block(matrix: dict[str, Any]) -> list[str]:
    """The staircase against its targets, per scenario (see docs/architecture.md)."""
    rows = matrix["results"]
    lines = [
        "### The staircase against its targets",
        "",
        "Per scenario, the staircase strategy with the lowest TTFT p50 whose quality is within "
        "1 point of the reference MoA's (quality paired: the same questions for every "
        "strategy). Targets: TTFT p50 at least 90% (long-form) or 65% (heterogeneous) below "
        "the reference MoA's, within 1.6x of the single best model's; in long-form, total time "
        "p50 no more than wait-all's and prompt tokens per run no more than 1.5x wait-all's. "
        "*Uncached* prompt tokens are the ones no prefix cache served (each step re-sends its "
        "prompt; the cached part of it costs no prefill).",
        "",
        "| scenario | staircase | TTFT p50 (vs reference MoA) | quality (vs reference) "
        "| TTFT / single best | total p50 (wait-all) | prompt tokens per run: all (cached) "
        "| uncached / wait-all | aggregator requests |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    found = False
    for name in SCENARIOS:
        f = staircase_figures(rows, name)
        if f is None:
            continue
        found = True
        quality = "-"
        if f["quality"] is not None and f["quality_diff"] is not None:
            quality = f"{_pct(f['quality'])} ({100 * f['quality_diff']:+.1f} points)"
        target = STAIRCASE_TARGETS.get(name)
        reduction = f"{100 * f['ttft_p50_reduction']:.0f}% lower"
        if target is not None:
            reduction += (
                " (target met)" if f["ttft_p50_reduction"] >= target else " (target missed)"
            )
        cached_share = (
            f"{100 * f['tokens_in_cached_mean'] / f['tokens_in_mean']:.0f}%"
            if f["tokens_in_mean"]
            else "-"
        )
        lines.append(
            f"| {name} | {f['strategy']} | {f['ttft_p50_s']:.2f} s vs "
            f"{f['reference_ttft_p50_s']:.2f} s: {reduction} | {quality}"
            + ("" if f["within_tolerance"] else " (none within 1 point)")
            + f" | {_x(f['ttft_over_single'])} | {_ms(f['total_p50_s'])} s "
            f"({_ms(f['wait_all_total_p50_s'])} s) | {f['tokens_in_mean']:,.0f} ({cached_share}) "
            f"| {_x(f['uncached_over_wait_all'])} | {f['aggregator_requests_mean'] or 1:.1f} |"
        )
    return [*lines, ""] if found else []


README = ROOT / "README.md"
README_START = "<!-- staircase-headline:start -->"
README_END = "<!-- staircase-headline:end -->"


def _fastest_within(results: list[dict[str, Any]], scenario: str) -> dict[str, Any] | None:
    """The strategy with the lowest TTFT p50 on ``scenario`` whose quality is within one point
    of the reference MoA's (the reference itself aside)."""
    rows = {r["strategy"]: r for r in results if r["scenario"] == scenario}
    base = rows.get("reference-moa")
    if base is None or base["quality"] is None:
        return None
    floor = base["quality"] - 0.01 - 1e-9
    eligible = [
        r
        for name, r in rows.items()
        if name != "reference-moa" and r["ttft_p50_s"] is not None and (r["quality"] or 0) >= floor
    ]
    return min(eligible, key=lambda r: r["ttft_p50_s"]) if eligible else None


def _staircase_sentence(f: dict[str, Any]) -> str:
    return (
        f"the first token **{100 * f['ttft_p50_reduction']:.0f}% sooner at the median than "
        f"the reference MoA** ({f['ttft_p50_s']:.2f} s against {f['reference_ttft_p50_s']:.2f} "
        f"s) at {100 * f['quality_diff']:+.1f} points of quiz accuracy ({_pct(f['quality'])} "
        f"against {_pct(f['reference_quality'])})"
    )


def readme_headline(matrix: dict[str, Any]) -> str | None:
    """The README's benchmark sentence: the staircase on the first of long-form and
    heterogeneous where it keeps quality within a point of the reference MoA, and its figures
    on long-form (chat-length answers) when that is not the one; else, on long-form, the
    fastest strategy that keeps quality, with the staircase's trade-off beside it."""
    results = matrix["results"]
    figures = {name: staircase_figures(results, name) for name in ("long-form", "heterogeneous")}
    where = (
        "On the simulator's {name} scenario (four proposers of four model classes, 64 runs in "
        "flight, a 2-core machine)"
    )
    for name, f in figures.items():
        if f is None or f["quality_diff"] is None or not f["within_tolerance"]:
            continue
        text = (
            f"{where.format(name=name)}, the **staircase** ({f['strategy']}) shows "
            f"{_staircase_sentence(f)}"
        )
        if f["ttft_over_single"] is not None:
            text += f", {f['ttft_over_single']:.1f}x the single best model's TTFT"
        text += "."
        other = figures["long-form"]
        if name != "long-form" and other is not None and other["quality_diff"] is not None:
            text += (
                f" With chat-length answers (long-form) the staircase ({other['strategy']}) "
                f"shows {_staircase_sentence(other)}: the proposers that start last often "
                "miss its conclusion."
            )
        rows = {r["strategy"]: r for r in results if r["scenario"] == "long-form"}
        plain, base = rows.get("staircase"), rows.get("reference-moa")
        if plain is not None and base is not None and plain["quality"] is not None:
            text += (
                f" The default `staircase` answers there in {plain['ttft_p50_s']:.2f} s at "
                f"{100 * (plain['quality'] - base['quality']):+.1f} points"
            )
            gap = plain.get("longest_gap_p99_s")
            if gap is not None:
                text += f", its longest pause between chunks {gap:.2f} s at p99"
            text += "."
        return text
    f = figures["long-form"]
    if f is None or f["quality_diff"] is None:
        return None
    best = _fastest_within(results, "long-form")
    if best is None:
        return (
            f"{where.format(name='long-form')}, the **staircase** shows {_staircase_sentence(f)}."
        )
    reduction = 1.0 - best["ttft_p50_s"] / f["reference_ttft_p50_s"]
    return (
        f"{where.format(name='long-form')}, the fastest strategy within a point of the "
        f"reference MoA's quiz accuracy is **{best['strategy']}**: the first token "
        f"**{100 * reduction:.0f}% sooner at the median** ({best['ttft_p50_s']:.2f} s against "
        f"{f['reference_ttft_p50_s']:.2f} s), {_pct(best['quality'])} against "
        f"{_pct(f['reference_quality'])}. The staircase ({f['strategy']}) shows "
        f"{_staircase_sentence(f)}."
    )


def update_readme(matrix: dict[str, Any]) -> None:
    sentence = readme_headline(matrix)
    text = README.read_text(encoding="utf-8")
    if sentence is None or README_START not in text or README_END not in text:
        return
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    README.write_text(f"{head}{README_START}\n{sentence}\n{README_END}{tail}", encoding="utf-8")


def machine_block(matrix: dict[str, Any], over: dict[str, Any], busy: float | None) -> list[str]:
    meta = matrix["metadata"]
    m = meta["machine"]
    lines = [
        f"Generated by `make docs` (`.venv/bin/python benchmarks/make_docs.py`) on "
        f"{meta['date']}, on a **{m['cores']}-core** machine ({m['platform']}, {m['processor']}), "
        f"CPython {meta['python']}, {meta['loop']} for the matrix. The matrix took "
        f"{meta.get('seconds', '?')} s and the overhead benchmark {over.get('seconds', '?')} s.",
        "",
        f"Matrix command: `{meta['command']}`; overhead command: "
        "`.venv/bin/python benchmarks/overhead.py`. Raw figures: "
        "[results.json](benchmarks/results.json), [overhead.json](benchmarks/overhead.json), "
        "[summary.md](benchmarks/summary.md).",
        "",
    ]
    if busy is not None:
        bg_matrix = meta.get("background_cores")
        bg_over = over.get("background_cores")
        text = (
            f"With two cores, anything else running on the machine shows up in these "
            f"latencies, so it was measured: other processes kept {100 * busy:.0f}% of the CPUs "
            "busy in the second before the run started"
        )
        if bg_matrix is not None and bg_over is not None:
            text += (
                f", and used {bg_matrix:.2f} of a core on average during the matrix and "
                f"{bg_over:.2f} during the overhead benchmark"
            )
        lines += [text + ".", ""]
    return lines


def strategies_block() -> list[str]:
    lines = ["| strategy | what it does |", "|---|---|"]
    for s in STRATEGIES.values():
        lines.append(f"| {s.name} | {s.description.replace('|', chr(92) + '|')} |")
    note = (
        f"Times in these descriptions are at the simulator's real speed; the matrix below runs "
        f"at --time-scale {TIME_SCALE:g}, so the policies in its tables show them scaled."
    )
    return [*lines, "", note, ""]


def scenarios_block(matrix: dict[str, Any]) -> list[str]:
    lines = [
        "| scenario | models | layers | runs in flight | runs per strategy |",
        "|---|---|---|---|---|",
    ]
    for s in SCENARIOS.values():
        lines.append(
            f"| {s.name} | {s.description} | {s.layers} | {s.concurrency} | {s.requests} |"
        )
    return [*lines, ""]


def results_block(matrix: dict[str, Any]) -> list[str]:
    rows = matrix["results"]
    lines: list[str] = []
    for scenario in get_scenarios([*SCENARIOS, *PROFILED]):
        name = scenario.name
        mine = [r for r in rows if r["scenario"] == name]
        if not mine:
            continue
        lines += [f"### {name}", "", f"{scenario.description}.", "", render_table(mine), ""]
        integrity = render_integrity_table(mine)
        if integrity:
            lines += ["Answer integrity, stream smoothness and cost:", "", integrity, ""]
        for kind, caption in (
            ("pareto", "TTFT p50 against quality"),
            ("ttft-cdf", "TTFT distribution"),
            ("timeline", "one run (the same question) under each strategy"),
        ):
            path = OUT / f"{kind}-{name}.png"
            if path.exists():
                lines.append(f"![{name}: {caption}](benchmarks/{path.name})")
        lines.append("")
    return lines


def overhead_block(over: dict[str, Any]) -> list[str]:
    sched = over["schedule"]
    props = ", ".join(
        f"{p['name']} {1e3 * p['ttft_s']:.0f} ms TTFT + {p['tokens']} tokens at "
        f"{p['tokens_per_s']:.0f}/s"
        for p in sched["proposers"]
    )
    agg = sched["aggregator"]
    lines = [
        "### (a) TTFT overhead of the engine over the simulator's schedule",
        "",
        f"Fixed-latency models ({props}; aggregator {1e3 * agg['ttft_s']:.0f} ms TTFT), policy "
        f"`wait_all`, so every run's oracle TTFT is exactly {sched['oracle_ttft_ms']:.1f} ms. "
        f"The simulator runs in its own process; pinning: {over['pinning']}. "
        "*all*: observed TTFT minus the oracle. *client*: the part of it the client spent on "
        "the run's critical path, on its own clock: fan-out, turnaround and hand-off (defined "
        "below). The rest of *all* is loopback TCP, process wake-ups (this is a virtual "
        "machine) and the simulator's own request handling and lateness, which a real provider "
        "would replace with its own.",
        "",
        "| loop | concurrent runs | runs | all p50 (ms) | all p99 (ms) | client p50 (ms) "
        "| client p99 (ms) | fan-out p50 | turnaround p50 | hand-off p50 | client CPU "
        "| simulator CPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for loop, rows in over["engine"].items():
        for r in rows:
            lines.append(
                f"| {loop} | {r['concurrent']} | {r['runs']} | {_ms(r['overhead_p50_ms'])} | "
                f"{_ms(r['overhead_p99_ms'])} | {_ms(r['client_p50_ms'])} | "
                f"{_ms(r['client_p99_ms'])} | {_ms(r['fan_out_p50_ms'])} | "
                f"{_ms(r['turnaround_p50_ms'])} | {_ms(r['hand_off_p50_ms'])} | "
                f"{100 * r['client_cpu_share']:.0f}% | {100 * r['sim_cpu_share']:.0f}% |"
            )
    verdicts = []
    for loop, rows in over["engine"].items():
        for r in rows:
            if r["concurrent"] == 64 and r["client_p99_ms"] is not None:
                met = r["client_p99_ms"] < overhead.TARGET_P99_MS_AT_64
                verdicts.append(
                    f"{loop}: client p99 {r['client_p99_ms']:.2f} ms, "
                    + ("met" if met else "**not met**")
                    + f" (all p99 {r['overhead_p99_ms']:.2f} ms)"
                )
    lines += [
        "",
        "*fan-out*: run start until the last proposer request was written; *turnaround*: the "
        "read that brought the slowest proposer's last chunk until the aggregator's request was "
        "written (the engine's decision, the aggregator prompt, the request); *hand-off*: the "
        "read that brought the aggregator's first token until the caller had it.",
        "",
        f"Target: {over['target']}. " + "; ".join(verdicts) + ".",
        "",
        "### (b) Proposer chunk throughput",
        "",
        "`OpenAIProvider` against the leanest reader one could write by hand (aiohttp "
        "`iter_any()`, split on blank lines, `orjson.loads`), reading the same pre-built stream "
        "of small chunks as fast as a local server sends it (the server and readers of "
        "`benchmarks/provider_throughput.py`). Client CPU per chunk in microseconds.",
        "",
        "| loop | streams | bare chunks/s | provider chunks/s | provider / bare | bare µs/chunk "
        "| provider µs/chunk |",
        "|---|---|---|---|---|---|---|",
    ]
    for loop, rows in over["throughput"].items():
        for r in rows:
            lines.append(
                f"| {loop} | {r['streams']} | {r['bare_chunks_per_s']:,.0f} | "
                f"{r['provider_chunks_per_s']:,.0f} | {r['ratio']:.2f} | "
                f"{r['bare_us_per_chunk']:.2f} | {r['provider_us_per_chunk']:.2f} |"
            )
    return [*lines, ""]


METHOD = """\
## What is measured

Each strategy answers the same runs on each scenario: one run is one user prompt (a quiz
question), answered through the strategy; `--concurrency` runs are kept in flight at once. Each
strategy gets a fresh simulated upstream with the same seed, so every strategy meets exactly the
same proposer timings and the same proposer answers: the differences are the strategies'.

- **TTFT**: from the run's start to the first token of the final answer at the caller.
  **total**: to the last token. p50/p95/p99 over the runs (linear interpolation).
- **tokens in (cached) / out per run**: prompt and completion tokens of every request of a run
  (proposers, cancelled ones included, counted up to where they were cancelled, and the
  aggregator), as the upstream counted them (for engine runs, from the simulator's own
  records: a staircase step closed early never receives its usage chunk); in brackets the share
  of prompt tokens the model's prefix cache served, which cost no prefill time. A † marks
  counts of which part is an estimate (a request cancelled before its usage chunk, counted from
  the characters that arrived, or an upstream that sends no usage); the line under the table
  says in how many runs.
- **aggregator requests**: per run; one per staircase step.
- **refs complete / partial**: references per run that went forward complete, or partial (a
  partial policy took a proposer's text before it finished; for a staircase, what the start
  rule took: later steps see more).
- **quality**: the fraction of runs whose final answer is exactly right (Wilson 95% interval).
- **oracle**: the TTFT the same references would have allowed with zero orchestration cost, from
  the simulator's own schedule. The simulator plans every reply before writing a byte (the time of
  each token after the request arrives, a pure function of the model, the request, the seed and
  what its prefix cache held) and keeps that plan in its request records, so the benchmark looks
  up, for each request a run made, when its tokens left the server: the oracle is, per layer, the
  latest time a used reference was usable (a complete one at its end, a partial one at its last
  used token; retries cost what the simulator made them cost), summed over layers, plus the
  aggregator's scheduled TTFT. *measured / oracle* is the median of the per-run ratios. The bound
  is on orchestration, not on the policy: a deadline that waited longer than its references needed
  shows as measured > oracle.
- The **reference MoA** is the original method, written without the engine: proposers are
  asked with ordinary non-streaming requests (one JSON answer each), the layer waits for all
  of them, then the aggregator's answer is streamed. It drops a proposer that keeps failing
  instead of crashing.

Under each scenario's main table, a second one says whether the answers that came early still
hold together, how smoothly they streamed and what they cost (`moa_stream.bench.integrity`;
over the runs that did not fail):

- **restarts / answer**: sentences that start the answer over. Sentences are split on `.`,
  `!`, `?` and line breaks; a sentence restarts when its first four words (lowercased,
  punctuation dropped) open an earlier sentence of the same answer, also with one word inserted
  ("The sky is blue. The sky is indeed blue, ..." is one restart). Sentences under four words
  never count.
- **answers with markup**: answers holding prompt markup (`<draft`, `</draft>`, `status="`,
  chat-template tokens such as `<|im_start|>`) or a run of six or more consecutive words of the
  aggregator's own instructions, header or continue text (the templates of
  `moa_stream.engine.prompts`); the line under the table quotes a few of the pieces found.
- **words p50 (x one-shot)**: the answer's length in words, and in brackets the median over
  runs of its ratio to the `single` strategy's answer to the same question (blank where
  `single` did not run).
- **ended early**: runs whose answer ended while a proposer of the last layer was still
  writing *and* that have fewer than half the one-shot answer's words: an aggregator that gave
  up before its references were in. A short answer after every reference finished is the
  aggregator's choice and does not count.
- **ITL p50 / p99**: inter-token latency as vLLM reports it, the gaps between consecutive
  content chunks as the caller received them, pooled over every run of the strategy (a chunk
  may hold several tokens; `<0.1 ms` is chunks that arrived in one read). **longest gap p50 /
  p99**: each run's longest gap, over the runs; **gaps > 1 s per run**: stalls a reader
  notices, such as a staircase waiting for its proposers between steps.
- **total p50** and **aggregator requests / run** as in the main table; **prompt tokens per
  run: all / uncached**, the mean over runs, uncached being what no prefix cache served.
- **bill vs wait-all**: the mean bill per run over wait-all's on the same scenario (the
  reference MoA's where wait-all did not run), under three price models, each counting in
  units of one uncached input token, with every output token at 4 units (hosted models price
  output at 3-5x input):
  - `no-cache`: every prompt token at full price (1);
  - `cached-0.5x`: prompt tokens served from the prefix cache at 0.5, the rest at 1 (automatic
    caching as OpenAI bills it);
  - `cached-0.1x-write-1.25x`: cached prompt tokens at 0.1, uncached ones at 1.25, since each
    is written to the cache (explicit caching as Anthropic bills it, every prompt cacheable).

  A staircase re-sends its growing prompt at every step, so it pays for many more prompt
  tokens than wait-all; how much of that the bill shows depends on the cache.

Headline reductions carry a 95% interval: a bootstrap over the runs, paired by question (every
strategy answers the same questions), 2,000 resamples; a figure from fewer than 30 runs says
"indicative only".

### The quality model (offline)

Quality is measured, not assumed, but offline it is measured on a model of quality: the
simulator's quiz (`moa_stream.sim.quiz`), 120 arithmetic word problems with exact answers.
Each simulated model answers a question correctly with its own fixed probability (its
`accuracy`); when wrong, it gives a wrong number fixed per model and question, so different
models tend to be wrong differently. A model that sees answers in its prompt (an aggregator,
or a refinement layer) gives the most common one it can see, and on a tie answers as it would
alone. Every reply ends with its `Answer: N` line (in the answer-first scenario it starts with
it), so a partial reference taken before that line shows no answer. A run is right when the
last `Answer: N` of its final text is the gold answer. A staircase aggregator continues one
planned text across its steps and writes its answer line from what the step that writes it
shows, so its quality depends on whether the step that concludes has seen the proposers'
answer lines (the `lead` makes it wait for them; `staircase-unpaced` does not).

This illustrates the trade the strategies make (waiting for more references against answering
sooner); it is not a claim about how real models reason or how much real aggregation helps.
Against real endpoints, `moa-stream bench --config FILE` asks thirty arithmetic word problems
shipped with the package (prompts ask for a final line `Answer: N`, scored exactly), or rates
open-ended prompts with an LLM judge (`--prompts FILE --judge AGENT`).
"""

CAVEATS = """\
## Reading these numbers honestly

- **Two cores.** The client (engine, providers, this benchmark) and the simulated upstream
  share a two-core machine. The simulator runs in a separate process so that it doesn't take
  the client's core, but at 64 runs in flight the two processes together ask a large part of
  both cores; at 256 (overhead benchmark) the simulator and the client are each close to a core
  of their own. Latencies under load are the client's *and* the simulator's; the overhead table
  separates them.
- **Time scale.** To fit the matrix in about ten minutes, every simulated delay is halved and
  every decode rate doubled (`--time-scale 0.5`; policy deadlines are halved with them). The
  shape of the trade does not depend on it; fixed per-request costs of the client weigh twice
  as much as they would at real speed, and the client reads twice as many chunks per second.
- **Sample sizes.** 120 runs per strategy at 64 in flight (12 one at a time): a p99 of 120 runs
  is close to the largest value; read it as a tail indicator, not a precise figure. Quality
  intervals are wide (about ±6 points at 120 runs); but every strategy answers the same
  questions with the same proposer answers, so differences between strategies are paired and
  much tighter than the intervals suggest.
- **Simulated quality.** See above: the quiz model decides which references help, and it
  rewards seeing complete answers. Staircase policies cannot gain quality from a reference
  that has not reached its conclusion; the answer-first scenario shows what changes when it
  has.
"""

REPRODUCE = """\
## Reproducing

_Not run by the docs test: the whole matrix takes about ten minutes._

```sh
make docs                                          # this page (about ten minutes)
.venv/bin/moa-stream bench --quick --out /tmp/b    # a seconds-long smoke run
.venv/bin/moa-stream bench --scenario heterogeneous --strategy reference-moa quorum-2 \\
    'policy:quorum(2) | deadline(1.0)' --out /tmp/b   # any policy is one argument
.venv/bin/moa-stream bench --config my.toml --moa fast --out /tmp/real   # real endpoints
.venv/bin/python benchmarks/overhead.py            # the overhead tables
.venv/bin/python benchmarks/real_inference.py      # real inference (the `real` extra)
.venv/bin/python benchmarks/parroting.py           # scaffolding copied by a small aggregator
```
"""


def write_page(matrix: dict[str, Any], over: dict[str, Any], busy: float | None) -> None:
    lines = ["# Benchmarks: TTFT against quality and cost", ""]
    lines += headline_block(matrix)
    lines += machine_block(matrix, over, busy)
    lines += [METHOD, "### Strategies", "", *strategies_block()]
    lines += ["### Scenarios", "", *scenarios_block(matrix)]
    lines += ["## Results", "", *staircase_block(matrix), *results_block(matrix)]
    lines += ["## Engine overhead", "", *overhead_block(over)]
    if REAL_SECTION.exists():
        lines += [REAL_SECTION.read_text(encoding="utf-8")]
    lines += [CAVEATS, REPRODUCE]
    PAGE.write_text("\n".join(lines), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="a small smoke run, not for publishing"
    )
    parser.add_argument("--reuse", action="store_true", help="rewrite the page from existing JSON")
    parser.add_argument("--idle-wait", type=float, default=300.0, help="seconds to wait for idle")
    args = parser.parse_args(argv)
    quiet_logs()
    OUT.mkdir(parents=True, exist_ok=True)
    busy: float | None = None
    if args.reuse:
        matrix = orjson.loads((OUT / "results.json").read_bytes())
        over = orjson.loads((OUT / "overhead.json").read_bytes())
        busy = matrix["metadata"].get("background_cpu_busy")
    else:
        busy = wait_for_idle(args.idle_wait)
        with CpuWatch() as watch:
            matrix = run_matrix(args.quick)
        matrix["metadata"]["background_cpu_busy"] = round(busy, 3)
        matrix["metadata"]["background_cores"] = round(watch.background_share, 3)
        (OUT / "results.json").write_bytes(orjson.dumps(matrix, option=orjson.OPT_INDENT_2) + b"\n")
        with CpuWatch() as watch:
            over = run_overhead(args.quick)
        over["background_cores"] = round(watch.background_share, 3)
        (OUT / "overhead.json").write_bytes(orjson.dumps(over, option=orjson.OPT_INDENT_2) + b"\n")
    write_page(matrix, over, busy)
    if not args.quick:
        update_readme(matrix)
    sys.stdout.write(f"wrote {PAGE.relative_to(ROOT)} and {OUT.relative_to(ROOT)}/\n")
    if matrix.get("headline"):
        sys.stdout.write("headline: " + headline_sentence(matrix["headline"]) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
