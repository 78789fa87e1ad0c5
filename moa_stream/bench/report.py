"""Turning runs into figures: per-cell statistics, ``results.json``, ``summary.md``, headline.

``results.json`` is read by other tools; its shape is::

    {"metadata": {...machine, python, loop, seed, requests, date, command...},
     "headline": {...} | null,
     "results": [{"strategy", "scenario", "ttft_p50_s", "ttft_p99_s", "total_p50_s",
                  "tokens", "quality", "oracle_ttft_p50_s", ...}, ...],
     "timelines": {"<scenario>/<strategy>": {...one run's trace...}}}

Times are seconds. ``tokens`` is the mean of prompt plus completion tokens over every request
of a run (proposers, cancelled ones included, and the aggregator); ``tokens_in_cached_mean``
is the part of the prompt tokens the servers served from their prefix caches, and
``aggregator_requests_mean`` the aggregator requests per run (one per staircase step).
``tokens_estimated_runs`` counts the runs where part of that usage is an estimate rather than
the server's count (an upstream sent no usage, or a request ended before its usage came);
results written before it existed lack it, and render without the marker.
``quality`` is the fraction of runs whose final answer was exactly right (``None`` for
open-ended prompts).

Answer integrity, smoothness and cost (see :mod:`moa_stream.bench.integrity`), over the runs
that did not fail: ``restarts_mean`` (sentences that start the answer over, per answer),
``markup_answers`` (answers holding prompt markup or prompt text; ``markup_examples`` a few of
the pieces), ``words_p50``, ``length_ratio_p50`` (each answer's words over the ``single``
strategy's answer to the same question), ``ended_early_runs`` (of ``ended_early_known``);
``itl_p50_s``/``itl_p99_s`` (every gap between consecutive content chunks of every run,
pooled, as vLLM reports inter-token latency), ``longest_gap_p50_s``/``longest_gap_p99_s``
(each run's longest gap, over the runs), ``gaps_over_1s_mean`` (per run); ``bill_mean`` (per
run, by price model, in uncached input tokens) and ``bill_vs_wait_all`` (that over the
wait-all strategy's, on the same scenario; ``bill_base`` names the strategy used when
wait-all did not run). Results written before these fields existed lack them.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from moa_stream.bench.integrity import (
    PRICE_MODELS,
    answer_integrity,
    bills,
    ended_early,
    inter_token_gaps,
    stream_gaps,
    word_count,
)
from moa_stream.bench.trace import RunTrace

__all__ = [
    "INDICATIVE_RUNS",
    "CellResult",
    "RunSample",
    "attach_one_shot",
    "headline",
    "headline_sentence",
    "percentile",
    "reduction_note",
    "render_integrity_table",
    "render_summary",
    "staircase_figures",
    "ttft_reduction_interval",
    "with_bill_ratios",
    "with_reduction_intervals",
    "summarize",
    "wilson_interval",
    "write_results",
]

#: Strategies that are not MoA policies, so never "the best policy".
NOT_POLICIES = frozenset({"reference-moa", "single"})


@dataclass(slots=True)
class RunSample:
    """One run's outcome. ``correct`` is ``None`` for open-ended prompts. ``tokens_estimated``:
    part of the run's usage is an estimate (see :attr:`moa_stream.Usage.estimated`).

    ``chunk_times``: when each content chunk of the answer reached the caller, in seconds since
    the run started. ``reference_ends``: when each proposer of the last layer ended (``None``:
    it had not), on the same clock; with the last chunk's time it says whether the answer ended
    while a reference was still being written. ``one_shot_words``: the length of the
    ``single`` strategy's answer to the same question, where it ran."""

    index: int
    question_id: str
    ttft_s: float | None
    total_s: float
    prompt_tokens: int
    completion_tokens: int
    refs_complete: int
    refs_partial: int
    refs_failed: int
    correct: bool | None
    cached_tokens: int = 0
    tokens_estimated: bool = False
    aggregator_requests: int = 1
    decided_s: float | None = None
    oracle_ttft_s: float | None = None
    decision_over_s: float | None = None
    aggregator_over_s: float | None = None
    judge_score: float | None = None
    error: str | None = None
    text: str = field(default="", repr=False)
    trace: RunTrace | None = field(default=None, repr=False)
    chunk_times: tuple[float, ...] = field(default=(), repr=False)
    reference_ends: tuple[float | None, ...] = field(default=(), repr=False)
    one_shot_words: int | None = None


@dataclass(slots=True)
class CellResult:
    """Every run of one strategy on one scenario."""

    strategy: str
    description: str
    policy: str
    scenario: str
    concurrency: int
    layers: int
    samples: list[RunSample]
    wall_s: float
    client_cpu_s: float
    timeline: RunTrace | None = None


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) with linear interpolation; ``None`` for no values."""
    if not values:
        return None
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """The Wilson score interval of a proportion (95% by default); ``None`` for ``n == 0``."""
    if n == 0:
        return None
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def _present(values: Iterable[float | None]) -> list[float]:
    return [v for v in values if v is not None]


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def summarize(cell: CellResult) -> dict[str, Any]:
    """The figures of one cell, as one item of ``results.json``'s ``results``."""
    samples = cell.samples
    ttfts = [s.ttft_s for s in samples if s.ttft_s is not None]
    totals = [s.total_s for s in samples if s.ttft_s is not None]
    oracles = [s.oracle_ttft_s for s in samples if s.oracle_ttft_s is not None]
    paired = [
        (s.ttft_s, s.oracle_ttft_s)
        for s in samples
        if s.ttft_s is not None and s.oracle_ttft_s is not None
    ]
    overheads = [m - o for m, o in paired]
    ratios = [m / o for m, o in paired if o > 0]
    decided = [s.decided_s for s in samples if s.decided_s is not None]
    graded = [s.correct for s in samples if s.correct is not None]
    judged = [s.judge_score for s in samples if s.judge_score is not None]
    n = len(samples)
    tokens_in = [float(s.prompt_tokens) for s in samples]
    tokens_out = [float(s.completion_tokens) for s in samples]
    right = sum(1 for c in graded if c)
    interval = wilson_interval(right, len(graded))
    mean_in = _mean(tokens_in) or 0.0
    mean_out = _mean(tokens_out) or 0.0
    mean_cached = _mean([float(s.cached_tokens) for s in samples]) or 0.0
    return {
        "strategy": cell.strategy,
        "scenario": cell.scenario,
        "description": cell.description,
        "policy": cell.policy,
        "concurrency": cell.concurrency,
        "layers": cell.layers,
        "requests": n,
        "errors": sum(1 for s in samples if s.error is not None),
        "ttft_p50_s": _round(percentile(ttfts, 50)),
        "ttft_p95_s": _round(percentile(ttfts, 95)),
        "ttft_p99_s": _round(percentile(ttfts, 99)),
        "ttft_mean_s": _round(_mean(ttfts)),
        "total_p50_s": _round(percentile(totals, 50)),
        "total_p95_s": _round(percentile(totals, 95)),
        "total_p99_s": _round(percentile(totals, 99)),
        "decided_p50_s": _round(percentile(decided, 50)),
        "oracle_ttft_p50_s": _round(percentile(oracles, 50)),
        "oracle_ttft_p99_s": _round(percentile(oracles, 99)),
        "overhead_p50_s": _round(percentile(overheads, 50), 5),
        "overhead_p99_s": _round(percentile(overheads, 99), 5),
        "oracle_ratio_p50": _round(percentile(ratios, 50)),
        "decision_over_p50_s": _round(
            percentile(_present(s.decision_over_s for s in samples), 50), 5
        ),
        "aggregator_over_p50_s": _round(
            percentile(_present(s.aggregator_over_s for s in samples), 50), 5
        ),
        "oracle_ratio_p99": _round(percentile(ratios, 99)),
        "tokens": round(mean_in + mean_out, 1),
        "tokens_in_mean": round(mean_in, 1),
        "tokens_out_mean": round(mean_out, 1),
        "tokens_in_cached_mean": round(mean_cached, 1),
        "tokens_in_uncached_mean": round(mean_in - mean_cached, 1),
        "tokens_estimated_runs": sum(1 for s in samples if s.tokens_estimated),
        "aggregator_requests_mean": _round(
            _mean([float(s.aggregator_requests) for s in samples]), 2
        ),
        "tokens_in_total": int(sum(tokens_in)),
        "tokens_out_total": int(sum(tokens_out)),
        "refs_complete_mean": _round(_mean([float(s.refs_complete) for s in samples]), 3),
        "refs_partial_mean": _round(_mean([float(s.refs_partial) for s in samples]), 3),
        "refs_failed_mean": _round(_mean([float(s.refs_failed) for s in samples]), 3),
        "quality": _round(right / len(graded)) if graded else None,
        "quality_n": len(graded),
        "quality_ci95": None if interval is None else [_round(x) for x in interval],
        "judge_score": _round(_mean(judged)),
        "wall_s": round(cell.wall_s, 3),
        "client_cpu_s": round(cell.client_cpu_s, 3),
        **_integrity_figures(samples),
    }


#: How many distinct pieces of copied markup ``results.json`` keeps per cell, as examples.
MARKUP_EXAMPLES = 3


def _integrity_figures(samples: Sequence[RunSample]) -> dict[str, Any]:
    """Answer integrity, stream smoothness and cost of a cell's runs that did not fail."""
    answered = [s for s in samples if s.error is None]
    checked = [(s, answer_integrity(s.text, one_shot_words=s.one_shot_words)) for s in answered]
    streamed = [s for s in answered if s.chunk_times]
    smooth = [stream_gaps(s.chunk_times, start=0.0, end=s.total_s) for s in streamed]
    pooled = [g for s in streamed for g in inter_token_gaps(s.chunk_times)]
    early = [
        ended_early(
            i.words,
            s.one_shot_words,
            answer_end=s.chunk_times[-1] if s.chunk_times else None,
            reference_ends=s.reference_ends,
        )
        for s, i in checked
    ]
    examples: list[str] = []
    for _, i in checked:
        for piece in i.markup:
            short = piece if len(piece) <= 80 else piece[:77] + "..."
            if short not in examples and len(examples) < MARKUP_EXAMPLES:
                examples.append(short)
    uncached = [float(s.prompt_tokens - s.cached_tokens) for s in samples]
    run_bills = [bills(s.prompt_tokens, s.cached_tokens, s.completion_tokens) for s in samples]
    return {
        "answers": len(answered),
        "restarts_mean": _round(_mean([float(i.restarts) for _, i in checked]), 3),
        "restarts_answers": sum(1 for _, i in checked if i.restarts),
        "markup_answers": sum(1 for _, i in checked if i.markup),
        "markup_examples": examples,
        "words_p50": _round(percentile([float(i.words) for _, i in checked], 50), 1),
        "length_ratio_p50": _round(percentile(_present(i.length_ratio for _, i in checked), 50), 3),
        "ended_early_runs": sum(1 for e in early if e),
        "ended_early_known": sum(1 for e in early if e is not None),
        "itl_p50_s": _round(percentile(pooled, 50), 5),
        "itl_p99_s": _round(percentile(pooled, 99), 5),
        "longest_gap_p50_s": _round(percentile([m.longest for m in smooth], 50), 4),
        "longest_gap_p99_s": _round(percentile([m.longest for m in smooth], 99), 4),
        "gaps_over_1s_mean": _round(_mean([float(m.stalls) for m in smooth]), 3),
        "streamed_runs": len(smooth),
        "prompt_tokens_p50": _round(percentile([float(s.prompt_tokens) for s in samples], 50), 1),
        "prompt_tokens_uncached_p50": _round(percentile(uncached, 50), 1),
        "bill_mean": {
            m.name: _round(_mean([b[m.name] for b in run_bills]), 1) for m in PRICE_MODELS
        },
    }


def attach_one_shot(cells: Sequence[CellResult], one_shot: str = "single") -> None:
    """Give every run the length of the one-shot answer to its question: the ``one_shot``
    strategy's answer on the same scenario (runs that failed there give none)."""
    lengths: dict[tuple[str, str], int] = {}
    for cell in cells:
        if cell.strategy != one_shot:
            continue
        for s in cell.samples:
            if s.error is None and s.text:
                lengths[(cell.scenario, s.question_id)] = word_count(s.text)
    for cell in cells:
        for s in cell.samples:
            s.one_shot_words = lengths.get((cell.scenario, s.question_id))


#: The strategies a bill is compared with, first found on the scenario: wait-all, else the
#: reference MoA (the same prompts, not streamed).
BILL_BASES = ("wait-all", "reference-moa")


def with_bill_ratios(results: Sequence[dict[str, Any]]) -> None:
    """Set each row's ``bill_vs_wait_all`` (its mean bill over wait-all's, per price model,
    on the same scenario) and ``bill_base`` (the strategy compared with), in place."""
    for row in results:
        rows = {r["strategy"]: r for r in results if r["scenario"] == row["scenario"]}
        base = next((rows[name] for name in BILL_BASES if name in rows), None)
        mine = row.get("bill_mean") or {}
        theirs = {} if base is None else base.get("bill_mean") or {}
        row["bill_base"] = None if base is None else base["strategy"]
        row["bill_vs_wait_all"] = {
            name: _round(mine[name] / theirs[name], 3) if theirs.get(name) else None
            for name in mine
            if mine[name] is not None
        }


#: Below this many paired runs a headline figure is called indicative only.
INDICATIVE_RUNS = 30


def ttft_reduction_interval(
    samples: Sequence[RunSample],
    baseline: Sequence[RunSample],
    *,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float, int] | None:
    """The 95% bootstrap interval of the TTFT p50 reduction of ``samples`` against
    ``baseline`` (``1 - p50 / baseline p50``), and the number of runs it rests on.

    Runs are paired by question (every strategy answers the same ones), and pairs are
    resampled: a question that is slow for both counts once, so the interval is about the
    strategies' difference, not the questions'. Seeded: the same runs give the same interval.
    ``None`` with fewer than two paired runs.
    """
    base = {s.question_id: s.ttft_s for s in baseline if s.ttft_s is not None}
    mine = {s.question_id: s.ttft_s for s in samples if s.ttft_s is not None}
    pairs = [(a, base[q]) for q, a in mine.items() if q in base]
    if len(pairs) < 2:
        return None
    rng = random.Random(seed)
    n = len(pairs)
    cuts = []
    for _ in range(resamples):
        drawn = [pairs[rng.randrange(n)] for _ in range(n)]
        ours = percentile([a for a, _ in drawn], 50)
        theirs = percentile([b for _, b in drawn], 50)
        if ours is not None and theirs:
            cuts.append(1.0 - ours / theirs)
    lo, hi = percentile(cuts, 2.5), percentile(cuts, 97.5)
    if lo is None or hi is None:
        return None
    return round(lo, 4), round(hi, 4), n


def with_reduction_intervals(head: dict[str, Any], cells: Sequence[CellResult]) -> None:
    """Add to ``head`` (a :func:`headline`) the bootstrap intervals of its TTFT reductions
    (``ttft_p50_reduction_ci95``, ``fastest_ttft_p50_reduction_ci95``) and the runs they
    rest on (``paired_runs``), in place."""
    by_name = {c.strategy: c for c in cells if c.scenario == head["scenario"]}
    base = by_name.get(head["baseline"])

    def interval(strategy: str) -> tuple[float, float, int] | None:
        cell = by_name.get(strategy)
        if cell is None or base is None:
            return None
        return ttft_reduction_interval(cell.samples, base.samples)

    best = interval(head["strategy"])
    fastest = best if head["fastest_strategy"] == head["strategy"] else None
    fastest = fastest or interval(head["fastest_strategy"])
    head["ttft_p50_reduction_ci95"] = None if best is None else [best[0], best[1]]
    head["paired_runs"] = None if best is None else best[2]
    head["fastest_ttft_p50_reduction_ci95"] = None if fastest is None else [fastest[0], fastest[1]]


def _overlap(a: Sequence[float] | None, b: Sequence[float] | None) -> bool:
    return a is not None and b is not None and a[0] <= b[1] and b[0] <= a[1]


def headline(
    results: Sequence[Mapping[str, Any]],
    scenario: str = "heterogeneous",
    *,
    baseline: str = "reference-moa",
    tolerance: float = 0.03,
) -> dict[str, Any] | None:
    """The fastest MoA policy on ``scenario`` whose quality is at most ``tolerance`` below the
    ``baseline``'s, against that baseline. ``None`` if the scenario or the baseline was not
    run.

    It is never called "best" outright: ``quality_separates`` is false when the quality
    figures cannot tell the strategies apart (none measured, or every strategy at the same
    figure, e.g. a judge whose replies did not parse, or 0% everywhere); the headline then
    names only the fastest policy and says why quality is silent. ``quality_within_noise`` is
    true when the chosen policy's 95% interval overlaps the baseline's, so that its quality
    difference is not evidence of a difference."""
    rows = [r for r in results if r["scenario"] == scenario]
    base = next((r for r in rows if r["strategy"] == baseline), None)
    if base is None or base["ttft_p50_s"] is None:
        return None
    policies = [
        r for r in rows if r["strategy"] not in NOT_POLICIES and r["ttft_p50_s"] is not None
    ]
    if not policies:
        return None
    measured = [r["quality"] for r in [base, *policies] if r["quality"] is not None]
    separates = len(measured) == len(policies) + 1 and max(measured) - min(measured) > 1e-9
    if separates:
        floor = base["quality"] - tolerance - 1e-9
        eligible = [r for r in policies if r["quality"] is not None and r["quality"] >= floor]
    else:
        eligible = policies
    if not eligible:
        return None
    best = min(eligible, key=lambda r: r["ttft_p50_s"])
    fastest = min(policies, key=lambda r: r["ttft_p50_s"])

    def delta(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else round(a - b, 4)

    if not measured:
        silent = "no quality was measured"
    elif len(measured) < len(policies) + 1:
        silent = "some strategies have no quality figure"
    else:
        silent = f"every strategy scored {100 * measured[0]:.1f}%"
    return {
        "scenario": scenario,
        "baseline": baseline,
        "strategy": best["strategy"],
        "policy": best["policy"],
        "ttft_p50_s": best["ttft_p50_s"],
        "baseline_ttft_p50_s": base["ttft_p50_s"],
        "ttft_p50_reduction": round(1.0 - best["ttft_p50_s"] / base["ttft_p50_s"], 4),
        "quality": best["quality"],
        "baseline_quality": base["quality"],
        "quality_diff": delta(best["quality"], base["quality"]),
        "quality_ci95": best.get("quality_ci95"),
        "baseline_quality_ci95": base.get("quality_ci95"),
        "quality_separates": separates,
        "quality_silent_reason": None if separates else silent,
        "quality_within_noise": separates
        and _overlap(best.get("quality_ci95"), base.get("quality_ci95")),
        "tolerance": tolerance,
        "runs": min(int(best.get("requests") or 0), int(base.get("requests") or 0)) or None,
        "fastest_strategy": fastest["strategy"],
        "fastest_ttft_p50_reduction": round(1.0 - fastest["ttft_p50_s"] / base["ttft_p50_s"], 4),
        "fastest_quality_diff": delta(fastest["quality"], base["quality"]),
    }


def staircase_figures(
    results: Sequence[Mapping[str, Any]], scenario: str, *, tolerance: float = 0.01
) -> dict[str, Any] | None:
    """The staircase on ``scenario`` against the reference MoA, wait-all and the single best
    model: the staircase strategy with the lowest TTFT p50 whose quality is at most
    ``tolerance`` below the reference MoA's (else the most accurate one). ``None`` if no
    staircase or no reference MoA ran there."""
    rows = {r["strategy"]: r for r in results if r["scenario"] == scenario}
    base = rows.get("reference-moa")
    stairs = [
        r
        for name, r in rows.items()
        if name.startswith("staircase") and r["ttft_p50_s"] is not None
    ]
    if base is None or base["ttft_p50_s"] is None or not stairs:
        return None
    floor = None if base["quality"] is None else base["quality"] - tolerance - 1e-9
    eligible = [r for r in stairs if floor is None or (r["quality"] or 0.0) >= floor]
    if eligible:
        best = min(eligible, key=lambda r: r["ttft_p50_s"])
    else:
        best = max(stairs, key=lambda r: (r["quality"] or 0.0, -r["ttft_p50_s"]))
    wait_all = rows.get("wait-all")
    single = rows.get("single")

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or not b else round(a / b, 3)

    quality_diff = None
    if best["quality"] is not None and base["quality"] is not None:
        quality_diff = round(best["quality"] - base["quality"], 4)
    return {
        "scenario": scenario,
        "strategy": best["strategy"],
        "policy": best["policy"],
        "within_tolerance": bool(eligible),
        "tolerance": tolerance,
        "ttft_p50_s": best["ttft_p50_s"],
        "reference_ttft_p50_s": base["ttft_p50_s"],
        "ttft_p50_reduction": round(1.0 - best["ttft_p50_s"] / base["ttft_p50_s"], 4),
        "quality": best["quality"],
        "reference_quality": base["quality"],
        "quality_diff": quality_diff,
        "single_ttft_p50_s": None if single is None else single["ttft_p50_s"],
        "ttft_over_single": ratio(
            best["ttft_p50_s"], None if single is None else single["ttft_p50_s"]
        ),
        "total_p50_s": best["total_p50_s"],
        "wait_all_total_p50_s": None if wait_all is None else wait_all["total_p50_s"],
        "tokens_in_mean": best["tokens_in_mean"],
        "tokens_in_cached_mean": best.get("tokens_in_cached_mean", 0.0),
        "tokens_in_uncached_mean": best.get("tokens_in_uncached_mean", best["tokens_in_mean"]),
        "wait_all_tokens_in_mean": None if wait_all is None else wait_all["tokens_in_mean"],
        "tokens_in_over_wait_all": ratio(
            best["tokens_in_mean"], None if wait_all is None else wait_all["tokens_in_mean"]
        ),
        "uncached_over_wait_all": ratio(
            best.get("tokens_in_uncached_mean", best["tokens_in_mean"]),
            None if wait_all is None else wait_all["tokens_in_mean"],
        ),
        "aggregator_requests_mean": best.get("aggregator_requests_mean"),
    }


def reduction_note(ci: Sequence[float] | None, runs: int | None) -> str:
    """What a TTFT reduction rests on, to follow its figure: its 95% interval and, below
    :data:`INDICATIVE_RUNS` runs, that it is indicative only (empty when neither is known)."""
    parts = []
    if ci:
        parts.append(f"95% interval {100 * ci[0]:.0f}-{100 * ci[1]:.0f}%")
    if runs is not None and runs < INDICATIVE_RUNS:
        parts.append(f"{runs} runs; indicative only")
    elif runs is not None and ci:
        parts.append(f"{runs} paired runs")
    return f" ({'; '.join(parts)})" if parts else ""


def headline_sentence(h: Mapping[str, Any]) -> str:
    """The headline as one sentence (two when a caveat is due). The reduction carries its
    interval, and says it is indicative only when it rests on few runs: a figure from eight
    runs can be 20 points off either way."""
    runs = h.get("paired_runs") or h.get("runs")
    speed = (
        f"cuts TTFT p50 by {100 * h['ttft_p50_reduction']:.0f}%"
        f"{reduction_note(h.get('ttft_p50_reduction_ci95'), runs)} against the reference MoA "
        f"({h['ttft_p50_s']:.2f} s vs {h['baseline_ttft_p50_s']:.2f} s)"
    )
    if not h.get("quality_separates", True):
        return (
            f"On the {h['scenario']} scenario the quality figures cannot separate the "
            f"strategies ({h.get('quality_silent_reason') or 'no usable quality'}), so no "
            f"policy is named best: the fastest, {h['strategy']} (`{h['policy']}`), {speed}."
        )
    text = (
        f"On the {h['scenario']} scenario, {h['strategy']} (`{h['policy']}`), the fastest "
        f"policy within {100 * h['tolerance']:.0f} points of the reference MoA's quality, {speed}"
    )
    if h["quality_diff"] is not None:
        text += (
            f", quality {100 * h['quality']:.1f}% vs {100 * h['baseline_quality']:.1f}% "
            f"({100 * h['quality_diff']:+.1f} points)"
        )
    text += "."
    if h.get("quality_within_noise") and h.get("quality_ci95") and h.get("baseline_quality_ci95"):
        lo, hi = h["quality_ci95"]
        blo, bhi = h["baseline_quality_ci95"]
        text += (
            f" The quality difference is within noise: the 95% intervals "
            f"({100 * lo:.0f}-{100 * hi:.0f}% and {100 * blo:.0f}-{100 * bhi:.0f}%) overlap."
        )
    return text


def _s(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 1.0 else f"{value:.2f} s"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _cell(text: str) -> str:
    # A "|" ends a Markdown table cell even inside a code span.
    return text.replace("|", "\\|")


#: Marks token counts of which part is an estimate; explained under the table.
ESTIMATED_MARK = "†"


def _tokens_estimated(r: Mapping[str, Any]) -> bool:
    # Results written before the field existed say nothing either way: no mark.
    return bool(r.get("tokens_estimated_runs"))


def _tokens_in_out(r: Mapping[str, Any]) -> str:
    cached = r.get("tokens_in_cached_mean") or 0.0
    share = f" ({100 * cached / r['tokens_in_mean']:.0f}%)" if r["tokens_in_mean"] else ""
    mark = f" {ESTIMATED_MARK}" if _tokens_estimated(r) else ""
    return f"{r['tokens_in_mean']:,.0f}{share} / {r['tokens_out_mean']:,.0f}{mark}"


def render_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """One scenario's results as a Markdown table."""
    header = (
        "| strategy | policy | TTFT p50 | p95 | p99 | oracle p50 | measured / oracle p50 "
        "| total p50 | tokens in (cached) / out per run | aggregator requests "
        "| refs complete / partial | quality (95% CI) | errors |"
    )
    lines = [header, "|" + "---|" * 13]
    for r in rows:
        ci = r.get("quality_ci95")
        quality = _pct(r["quality"])
        if ci:
            quality += f" ({100 * ci[0]:.0f}-{100 * ci[1]:.0f})"
        ratio = r.get("oracle_ratio_p50")
        lines.append(
            "| "
            + " | ".join(
                [
                    r["strategy"],
                    _cell(f"`{r['policy']}`"),
                    _s(r["ttft_p50_s"]),
                    _s(r["ttft_p95_s"]),
                    _s(r["ttft_p99_s"]),
                    _s(r.get("oracle_ttft_p50_s")),
                    "-" if ratio is None else f"{ratio:.2f}",
                    _s(r["total_p50_s"]),
                    _tokens_in_out(r),
                    f"{r.get('aggregator_requests_mean') or 1:.1f}",
                    f"{r['refs_complete_mean']:.2f} / {r['refs_partial_mean']:.2f}",
                    quality,
                    str(r["errors"]),
                ]
            )
            + " |"
        )
    estimated = [r for r in rows if _tokens_estimated(r)]
    if estimated:
        runs = ", ".join(
            f"{r['strategy']} {r['tokens_estimated_runs']} of {r.get('requests', '?')}"
            for r in estimated
        )
        lines += [
            "",
            f"{ESTIMATED_MARK} Part of the counted usage is an estimate, not the server's count "
            "(an upstream sent no usage, or a request ended before its usage came), in some "
            f"runs: {runs}.",
        ]
    return "\n".join(lines)


def _gap(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 0.00005:
        return "<0.1 ms"  # chunks that came in one read
    if value < 0.01:
        return f"{value * 1000:.1f} ms"
    return _s(value)


def _pair(a: str, b: str) -> str:
    return "-" if a == b == "-" else f"{a} / {b}"


def _bill_ratios(r: Mapping[str, Any]) -> str:
    ratios = r.get("bill_vs_wait_all") or {}
    if not any(v is not None for v in ratios.values()):
        return "-"
    return " / ".join(
        "-" if ratios.get(m.name) is None else f"{ratios[m.name]:.2f}x" for m in PRICE_MODELS
    )


def _code(text: str) -> str:
    # One line, no backticks, no table-ending pipes: a readable code span inside a table note.
    flat = " ".join(text.split()).replace("`", "'")
    return f"`{_cell(flat)}`"


def render_integrity_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """One scenario's answer integrity, stream smoothness and cost as a Markdown table, with
    notes under it (copied markup seen; the strategy bills are compared with). Empty for
    results written before these figures existed."""
    rows = [r for r in rows if "restarts_mean" in r]
    if not rows:
        return ""
    models = " / ".join(m.name for m in PRICE_MODELS)
    lines = [
        "| strategy | restarts / answer | answers with markup | words p50 (x one-shot) "
        "| ended early | ITL p50 / p99 | longest gap p50 / p99 | gaps > 1 s per run "
        "| total p50 | aggregator requests / run | prompt tokens per run: all / uncached "
        f"| bill vs wait-all ({models}) |",
        "|" + "---|" * 12,
    ]
    for r in rows:
        answers = r.get("answers", r.get("requests", 0))
        words = "-" if r.get("words_p50") is None else f"{r['words_p50']:.0f}"
        if r.get("length_ratio_p50") is not None:
            words += f" ({r['length_ratio_p50']:.2f}x)"
        known = r.get("ended_early_known") or 0
        early = f"{r.get('ended_early_runs', 0)} of {known}" if known else "-"
        stalls = r.get("gaps_over_1s_mean")
        restarts = r.get("restarts_mean")
        lines.append(
            "| "
            + " | ".join(
                [
                    r["strategy"],
                    "-" if restarts is None else f"{restarts:.2f}",
                    f"{r.get('markup_answers', 0)} of {answers}",
                    words,
                    early,
                    _pair(_gap(r.get("itl_p50_s")), _gap(r.get("itl_p99_s"))),
                    _pair(_gap(r.get("longest_gap_p50_s")), _gap(r.get("longest_gap_p99_s"))),
                    "-" if stalls is None else f"{stalls:.2f}",
                    _s(r.get("total_p50_s")),
                    f"{r.get('aggregator_requests_mean') or 1:.1f}",
                    f"{r['tokens_in_mean']:,.0f} / "
                    f"{r.get('tokens_in_uncached_mean', r['tokens_in_mean']):,.0f}",
                    _bill_ratios(r),
                ]
            )
            + " |"
        )
    notes = []
    copied = [r for r in rows if r.get("markup_examples")]
    if copied:
        notes.append(
            "Copied prompt markup or text, for example: "
            + "; ".join(
                f"{r['strategy']} {', '.join(_code(x) for x in r['markup_examples'])}"
                for r in copied
            )
            + "."
        )
    bases = {r.get("bill_base") for r in rows if r.get("bill_vs_wait_all")}
    if bases and "wait-all" not in bases:
        named = ", ".join(sorted(b for b in bases if b))
        notes.append(f"wait-all did not run here: bills are against {named}.")
    return "\n".join([*lines, *(["", *notes] if notes else [])])


def render_summary(
    results: Sequence[Mapping[str, Any]],
    metadata: Mapping[str, Any],
    scenarios: Mapping[str, str],
    head: Mapping[str, Any] | None,
    plots: Sequence[str] = (),
) -> str:
    """``summary.md``: the headline, then one table per scenario."""
    out = ["# moa-stream bench", ""]
    out.append(
        f"{metadata['date']} · {metadata['mode']} · {metadata['machine']['cores']} cores "
        f"({metadata['machine']['platform']}) · Python {metadata['python']} · "
        f"{metadata['loop']} · seed {metadata['seed']}"
    )
    out += ["", f"Command: `{metadata['command']}`", ""]
    for warning in metadata.get("warnings", ()):
        out += [f"> **{warning}**", ""]
    if head is not None:
        out += ["**" + headline_sentence(head) + "**", ""]
    for name, description in scenarios.items():
        rows = [r for r in results if r["scenario"] == name]
        if not rows:
            continue
        first = rows[0]
        out += [
            f"## {name}",
            "",
            f"{description}. {first['concurrency']} run(s) in flight, "
            f"{first['requests']} runs per strategy.",
            "",
            render_table(rows),
            "",
        ]
        integrity = render_integrity_table(rows)
        if integrity:
            out += [
                "Answer integrity, stream smoothness and cost (see docs/benchmarks.md):",
                "",
                integrity,
                "",
            ]
    if plots:
        out += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(out)


def write_results(
    path: Path,
    results: Sequence[Mapping[str, Any]],
    metadata: Mapping[str, Any],
    head: Mapping[str, Any] | None,
    timelines: Mapping[str, RunTrace],
) -> None:
    """Write ``results.json``."""
    document = {
        "metadata": dict(metadata),
        "headline": None if head is None else dict(head),
        "results": list(results),
        "timelines": {key: trace.to_json() for key, trace in timelines.items()},
    }
    path.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n")
