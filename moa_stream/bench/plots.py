"""The benchmark's plots (matplotlib, Agg backend, imported only when plots are drawn).

Per scenario: the TTFT CDF of every strategy, the Pareto chart of TTFT p50 against quality, and
the timeline of one run per strategy (the same question for each, so the same proposer
schedule): each proposer's request as a bar (waiting, then streaming), when the policy fired,
when the aggregator started and when its first token arrived.

matplotlib's objects are typed loosely, so they are handled as ``Any`` here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from moa_stream.bench.report import CellResult
from moa_stream.bench.trace import CallTrace, RunTrace

__all__ = ["draw_timeline", "write_plots"]

#: Strategies shown in a scenario's timeline, in this order, when they were run.
TIMELINE_STRATEGIES = ("reference-moa", "wait-all", "quorum-2", "partial", "staircase")

_WAIT = "#c9d6e8"
_STREAM = "#3b6ea8"
_WHOLE = "#8a8a8a"
_FIRED = "#c0392b"
_FIRST = "#1e8449"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, and no GUI toolkit imported
    import matplotlib.pyplot as plt

    return plt


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name)


#: Eight colours that stay apart for colour-blind readers (Okabe-Ito, black left out: it is the
#: reference MoA's) and four line styles: 32 distinct looks, so no two of the 19 built-in
#: strategies share one. Colour changes first, so strategies listed next to each other (the
#: staircase variants) differ in colour, not only in dashes.
_COLOURS = ("#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#f0e442", "#999999")
_STYLES = ("-", "--", ":", "-.")


def line_look(i: int) -> tuple[str, str]:
    """The colour and line style of the ``i``-th line of a chart: unique for ``i < 32``."""
    return _COLOURS[i % len(_COLOURS)], _STYLES[(i // len(_COLOURS)) % len(_STYLES)]


def _ttft_cdf(plt: Any, scenario: str, cells: Sequence[CellResult], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(9.5, 5.2))
    drawn = 0
    for cell in cells:
        values = sorted(s.ttft_s for s in cell.samples if s.ttft_s is not None)
        if not values:
            continue
        n = len(values)
        if cell.strategy == "reference-moa":
            colour, style, width = "black", "-", 2.2  # the baseline stands out
        else:
            colour, style = line_look(drawn)
            width = 1.6
            drawn += 1
        ax.step(
            values,
            [(i + 1) / n for i in range(n)],
            where="post",
            label=cell.strategy,
            color=colour,
            linestyle=style,
            linewidth=width,
        )
    ax.set_xlabel("TTFT (s)")
    ax.set_ylabel("fraction of runs")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"TTFT CDF · {scenario}")
    ax.grid(True, alpha=0.3)
    # Beside the plot, one entry per strategy in run order: inside, 16 entries hid the curves.
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _label_offsets() -> list[tuple[float, float]]:
    """Where a point's label may go, in points from the point, nearest first: right and left
    of it on its own line, then 16 directions at growing distances. The first spot that
    overlaps nothing wins, so a label moves away only as far as it must."""
    spots: list[tuple[float, float]] = [(6, -4), (-6, -4), (6, 4), (-6, 4)]
    for radius in (12, 20, 30, 42, 56, 72):
        for k in range(16):
            angle = 2 * math.pi * k / 16
            spots.append((radius * math.cos(angle), radius * math.sin(angle)))
    return spots


_LABEL_OFFSETS = _label_offsets()


def _place_labels(ax: Any, labelled: Sequence[tuple[str, float, float]], fontsize: float) -> None:
    """Annotate each ``(text, x, y)`` where its box collides with no earlier label and no
    marker and stays inside the axes, estimating a label's size from its length (no renderer
    round trip). Call it after the figure's layout is final: the axes' bounds are read here."""
    fig = ax.figure
    scale = fig.dpi / 72.0  # points -> pixels
    char_w, line_h = 0.6 * fontsize * scale, 1.25 * fontsize * scale
    to_px = ax.transData.transform
    bounds = ax.get_window_extent()
    frame_x0, frame_y0 = float(bounds.x0), float(bounds.y0)
    frame_x1, frame_y1 = float(bounds.x1), float(bounds.y1)
    markers = [to_px((x, y)) for _, x, y in labelled]
    placed: list[tuple[float, float, float, float]] = []

    def cost(box: tuple[float, float, float, float]) -> float:
        x0, y0, x1, y1 = box
        area = 0.0
        for a0, b0, a1, b1 in placed:
            w, h = min(x1, a1) - max(x0, a0), min(y1, b1) - max(y0, b0)
            if w > 0 and h > 0:
                area += w * h
        for mx, my in markers:
            r = 4 * scale  # a marker of size 7 pt, with a little room
            w, h = min(x1, mx + r) - max(x0, mx - r), min(y1, my + r) - max(y0, my - r)
            if w > 0 and h > 0:
                area += w * h
        # Outside the axes a label is cut off at the figure's edge or lands on the legend.
        inside_w = max(0.0, min(x1, frame_x1) - max(x0, frame_x0))
        inside_h = max(0.0, min(y1, frame_y1) - max(y0, frame_y0))
        area += 4 * ((x1 - x0) * (y1 - y0) - inside_w * inside_h)
        return area

    for text, x, y in labelled:
        px, py = to_px((x, y))
        width, height = char_w * len(text), line_h
        best: tuple[float, tuple[float, float], tuple[float, float, float, float]] | None = None
        for dx, dy in _LABEL_OFFSETS:
            left = px + dx * scale if dx >= 0 else px + dx * scale - width
            bottom = py + dy * scale if dy >= 0 else py + dy * scale - height
            if abs(dy) < 5:
                bottom = py - height / 2  # level with the point
            box = (left, bottom, left + width, bottom + height)
            found = cost(box)
            if best is None or found < best[0]:
                best = (found, (dx, dy), box)
            if found == 0:
                break
        assert best is not None
        _, (dx, dy), box = best
        placed.append(box)
        # Away from the point, a thin line says which point the label belongs to.
        far = math.hypot(dx, dy) > 10
        ax.annotate(
            text,
            (x, y),
            textcoords="offset points",
            xytext=(dx, dy),
            ha="left" if dx >= 0 else "right",
            va="center" if abs(dy) < 5 else ("bottom" if dy > 0 else "top"),
            fontsize=fontsize,
            arrowprops={"arrowstyle": "-", "color": "#888888", "lw": 0.6, "shrinkB": 4}
            if far
            else None,
        )


def _pareto(plt: Any, scenario: str, rows: Sequence[Mapping[str, Any]], path: Path) -> bool:
    points = [r for r in rows if r["ttft_p50_s"] is not None and r["quality"] is not None]
    if not points:
        return False
    fig, ax = plt.subplots(figsize=(10, 5.6))
    labelled_kinds: set[str] = set()
    for r in points:
        ci = r.get("quality_ci95")
        yerr = None
        if ci:
            yerr = [[max(0.0, r["quality"] - ci[0])], [max(0.0, ci[1] - r["quality"])]]
        baseline = r["strategy"] == "reference-moa"
        kind = "reference MoA (waits for all)" if baseline else "other strategies"
        ax.errorbar(
            r["ttft_p50_s"],
            r["quality"],
            yerr=yerr,
            fmt="s" if baseline else "o",
            color="black" if baseline else _STREAM,
            ecolor="#bbbbbb",
            capsize=2,
            markersize=7,
            zorder=3 if baseline else 2,  # on top of a strategy at the same spot
            label=None if kind in labelled_kinds else kind,
        )
        labelled_kinds.add(kind)
    # The Pareto front: no other strategy is both faster and better.
    front: list[Mapping[str, Any]] = []
    for r in sorted(points, key=lambda r: (r["ttft_p50_s"], -r["quality"])):
        if not front or r["quality"] > front[-1]["quality"]:
            front.append(r)
    ax.step(
        [r["ttft_p50_s"] for r in front],
        [r["quality"] for r in front],
        where="post",
        color=_FIRST,
        alpha=0.6,
        label="Pareto front",
    )
    if any(r.get("quality_ci95") for r in points):
        ax.plot([], [], color="#bbbbbb", linewidth=1.5, label="95% interval of the quality")
    ax.set_xlabel("TTFT p50 (s) · lower is better")
    ax.set_ylabel("quality: fraction answered correctly · higher is better")
    ax.set_title(f"TTFT against quality · {scenario}")
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.08, y=0.08)  # room for the labels of the outermost points
    # Legend and footnote beside the plot, the footnote under the legend: inside the axes they
    # covered points and each other.
    legend = ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    ns = sorted({int(r["quality_n"]) for r in points if r.get("quality_n")})
    if ns:
        runs = f"{ns[0]}" if len(ns) == 1 else f"{ns[0]}-{ns[-1]}"
        ax.annotate(
            f"{runs} graded runs per strategy:\npoints whose grey bars\noverlap are within noise",
            xy=(0, 0),
            xycoords=legend,
            xytext=(0, -6),
            textcoords="offset points",
            va="top",
            fontsize=7,
            color="#555555",
            annotation_clip=False,
        )
    fig.tight_layout()
    # Strategies that land on the same spot (wait-all and the reference MoA, say) share one
    # label, so that their names don't print over each other. Placed after the layout, so that
    # they are kept inside the axes as they are drawn.
    spots: dict[tuple[float, float], list[Mapping[str, Any]]] = {}
    span = max(r["ttft_p50_s"] for r in points) or 1.0
    for r in points:
        key = (round(r["ttft_p50_s"] / span, 2), round(r["quality"], 2))
        spots.setdefault(key, []).append(r)
    _place_labels(
        ax,
        [
            (", ".join(r["strategy"] for r in group), group[0]["ttft_p50_s"], group[0]["quality"])
            for group in spots.values()
        ],
        fontsize=8,
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def draw_timeline(ax: Any, trace: RunTrace, title: str, *, x_max: float | None = None) -> None:
    """One run on ``ax``: a row per request, a bar from its start to its first token (light)
    and on to its end (dark; grey for an answer that came whole), the layer decisions (red,
    dashed) and the first answer token (green). A staircase's aggregator requests share one
    row, each step's start marked with a black tick.

    The TTFT's label sits in an empty band above the top row, on a white ground, so no bar
    runs under it; ``x_max`` (the shared axis' end, when panels share one) says when it must
    go left of its line to stay in the picture."""
    calls = list(trace.calls)
    aggregators = [c for c in calls if c.role == "aggregator"]
    staircase = len(aggregators) > 1
    rows: list[list[CallTrace]] = []
    for call in calls:
        if staircase and call.role == "aggregator":
            if call is aggregators[0]:
                rows.append(aggregators)
            continue
        rows.append([call])
    labels = []
    for row, group in enumerate(rows):
        y = len(rows) - 1 - row
        first_call = group[0]
        prefix = f"L{first_call.layer} " if first_call.role == "proposer" else "agg "
        label = prefix + first_call.agent
        if len(group) > 1:
            label = f"agg: {len(group)} steps"
        labels.append((y, label))
        for call in group:
            _bar(ax, y, call, trace.total_s)
            if len(group) > 1:
                ax.plot([call.started_s] * 2, [y - 0.38, y + 0.38], color="black", linewidth=0.8)
    for layer in trace.layers:
        ax.axvline(layer.decided_s, color=_FIRED, linestyle="--", linewidth=1.2)
    ax.set_ylim(-0.6, len(rows) - 0.4 + _LABEL_BAND)
    if trace.ttft_s is not None:
        ax.axvline(trace.ttft_s, color=_FIRST, linewidth=1.5)
        end = x_max if x_max is not None else trace.total_s
        left = end > 0 and trace.ttft_s > 0.75 * end
        ax.annotate(
            f"TTFT {trace.ttft_s:.2f} s",
            xy=(trace.ttft_s, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(-4 if left else 4, -2),
            textcoords="offset points",
            ha="right" if left else "left",
            va="top",
            fontsize=8,
            color=_FIRST,
            bbox={"boxstyle": "square,pad=0.15", "facecolor": "white", "edgecolor": "none"},
        )
    ax.set_yticks([y for y, _ in labels], [text for _, text in labels], fontsize=8)
    ax.set_title(title, fontsize=9, loc="left")
    ax.grid(True, axis="x", alpha=0.3)


#: Rows of empty space above a timeline's top bar, where the TTFT label goes.
_LABEL_BAND = 0.7


def _bar(ax: Any, y: int, call: CallTrace, total_s: float) -> None:
    end = call.started_s + (call.duration_s if call.duration_s is not None else 0.0)
    if call.duration_s is None:
        end = total_s
    if call.ttft_s is not None:
        first = call.started_s + call.ttft_s
        ax.barh(y, first - call.started_s, left=call.started_s, color=_WAIT, height=0.6)
        ax.barh(y, end - first, left=first, color=_STREAM, height=0.6)
    else:
        color = _WHOLE if not call.streamed else _WAIT
        ax.barh(y, end - call.started_s, left=call.started_s, color=color, height=0.6)
    if call.status == "failed" or (call.status == "cancelled" and call.role == "proposer"):
        ax.plot([end], [y], marker="x", color=_FIRED, markersize=7)


def _rows(trace: RunTrace) -> int:
    aggregators = sum(1 for c in trace.calls if c.role == "aggregator")
    return len(trace.calls) - max(0, aggregators - 1)


def _timeline(plt: Any, scenario: str, chosen: Sequence[CellResult], path: Path) -> bool:
    if not chosen:
        return False
    rows = sum(_rows(c.timeline) for c in chosen if c.timeline is not None)
    height = 1.5 + 0.32 * (rows + _LABEL_BAND * len(chosen)) + 0.5 * len(chosen)
    fig, axes = plt.subplots(len(chosen), 1, figsize=(9, height), sharex=True)
    if len(chosen) == 1:
        axes = [axes]
    x_max = max(c.timeline.total_s for c in chosen if c.timeline is not None)
    for ax, cell in zip(axes, chosen, strict=True):
        assert cell.timeline is not None
        draw_timeline(ax, cell.timeline, f"{cell.strategy}: {cell.policy}", x_max=x_max)
    # Two lines: on one, the key ran past the figure's edge.
    axes[-1].set_xlabel(
        "seconds since the run started\nbars: waiting (light), streaming (dark), whole answer "
        "(grey) · red: policy fired · green: first token · ticks: staircase steps"
    )
    axes[-1].xaxis.label.set_fontsize(8)
    fig.suptitle(f"One run, same question for every strategy · {scenario}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_plots(
    out: Path,
    cells: Sequence[CellResult],
    results: Sequence[Mapping[str, Any]],
    head: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Draw every plot into ``out``; the files written."""
    plt = _pyplot()
    files: list[Path] = []
    scenarios = list(dict.fromkeys(c.scenario for c in cells))
    for scenario in scenarios:
        mine = [c for c in cells if c.scenario == scenario]
        slug = _slug(scenario)
        path = out / f"ttft-cdf-{slug}.png"
        _ttft_cdf(plt, scenario, mine, path)
        files.append(path)
        path = out / f"pareto-{slug}.png"
        if _pareto(plt, scenario, [r for r in results if r["scenario"] == scenario], path):
            files.append(path)
        path = out / f"timeline-{slug}.png"
        if _timeline(plt, scenario, _timeline_cells(mine, head), path):
            files.append(path)
    return files


def _timeline_cells(
    cells: Sequence[CellResult], head: Mapping[str, Any] | None
) -> list[CellResult]:
    """The cells a scenario's timeline shows: the usual ones, and the headline's best policy
    in its scenario (it belongs next to the baseline)."""
    cells = [c for c in cells if c.timeline is not None]
    names = list(TIMELINE_STRATEGIES)
    is_headline = head is not None and cells and cells[0].scenario == head["scenario"]
    if is_headline and head is not None and head["strategy"] not in names:
        names = [*names[:3], head["strategy"]]
    chosen = [c for name in names for c in cells if c.strategy == name]
    return chosen or cells[:4]
