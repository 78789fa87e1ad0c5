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
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from moa_stream.bench.trace import RunTrace

__all__ = [
    "CellResult",
    "RunSample",
    "headline",
    "headline_sentence",
    "percentile",
    "render_summary",
    "staircase_figures",
    "summarize",
    "wilson_interval",
    "write_results",
]

#: Strategies that are not MoA policies, so never "the best policy".
NOT_POLICIES = frozenset({"reference-moa", "single"})


@dataclass(slots=True)
class RunSample:
    """One run's outcome. ``correct`` is ``None`` for open-ended prompts. ``tokens_estimated``:
    part of the run's usage is an estimate (see :attr:`moa_stream.Usage.estimated`)."""

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
    }


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


def headline_sentence(h: Mapping[str, Any]) -> str:
    """The headline as one sentence (two when a caveat is due)."""
    speed = (
        f"cuts TTFT p50 by {100 * h['ttft_p50_reduction']:.0f}% against the reference MoA "
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
