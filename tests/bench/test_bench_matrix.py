"""A tiny matrix run end to end: the files it writes and the sanity of their figures."""

from __future__ import annotations

import math
from pathlib import Path

import orjson
import pytest

from moa_stream import cli
from moa_stream.bench import BenchSettings, run_bench

REQUIRED = (
    "strategy",
    "scenario",
    "ttft_p50_s",
    "ttft_p99_s",
    "total_p50_s",
    "tokens",
    "quality",
    "oracle_ttft_p50_s",
)


async def test_quick_matrix_writes_results_summary_and_plots(tmp_path: Path) -> None:
    settings = BenchSettings(
        out=tmp_path,
        quick=True,
        strategies=("reference-moa", "quorum-2"),
        requests=6,
        concurrency=3,
        sim_process=False,
    )
    output = await run_bench(settings)

    document = orjson.loads((tmp_path / "results.json").read_bytes())
    meta = document["metadata"]
    for key in ("machine", "python", "loop", "seed", "requests", "date"):
        assert key in meta
    assert meta["machine"]["cores"] >= 1
    rows = document["results"]
    assert [r["strategy"] for r in rows] == ["reference-moa", "quorum-2"]
    for row in rows:
        for key in REQUIRED:
            assert key in row, key
        assert row["scenario"] == "quick"
        assert row["requests"] == 6
        assert row["errors"] == 0
        assert 0 < row["ttft_p50_s"] <= row["ttft_p99_s"]
        assert row["ttft_p50_s"] <= row["total_p50_s"]
        assert row["tokens"] > 0
        assert row["tokens_in_mean"] > 0 and row["tokens_out_mean"] > 0
        assert 0.0 <= row["quality"] <= 1.0
        # The oracle is a lower bound: measured TTFT can only add orchestration to it.
        assert row["oracle_ttft_p50_s"] is not None
        assert row["oracle_ttft_p50_s"] <= row["ttft_p50_s"] + 0.002
        assert row["oracle_ratio_p50"] >= 0.95
        assert math.isfinite(row["overhead_p50_s"])
    baseline, quorum = rows
    assert baseline["refs_complete_mean"] == 3.0
    assert quorum["refs_complete_mean"] == 2.0
    assert quorum["ttft_p50_s"] < baseline["ttft_p50_s"]

    assert document["headline"]["scenario"] == "quick"
    assert document["headline"]["strategy"] == "quorum-2"
    assert "quick/reference-moa" in document["timelines"]

    pngs = _check_summary_and_plots(tmp_path)
    assert {p.name for p in output.files} >= {"results.json", "summary.md", *pngs}


def _check_summary_and_plots(out: Path) -> list[str]:
    summary = (out / "summary.md").read_text()
    assert "| reference-moa |" in summary and "| quorum-2 |" in summary
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["pareto-quick.png", "timeline-quick.png", "ttft-cdf-quick.png"]
    for name in pngs:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"![{name}]({name})" in summary
    return pngs


def test_cli_bench_runs_and_rejects_unknown_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    argv = ["bench", "--quick", "--strategy", "single", "--requests", "2", "--in-process"]
    assert cli.main([*argv, "--no-plots", "--out", str(out)]) == 0
    assert (out / "results.json").exists() and (out / "summary.md").exists()
    assert not list(out.glob("*.png"))

    assert cli.main(["bench", "--strategy", "nope", "--out", str(out)]) == 2
    assert "unknown strategy 'nope'" in capsys.readouterr().err


async def test_staircase_rows_count_steps_and_cached_prompt_tokens(tmp_path: Path) -> None:
    """A staircase asks its aggregator several times; the simulator's records say how much of
    those prompts its prefix cache served, and the timeline draws the steps on one row."""
    settings = BenchSettings(
        out=tmp_path,
        quick=True,
        strategies=("wait-all", "staircase", "staircase-prefill"),
        requests=4,
        concurrency=2,
        sim_process=False,
    )
    await run_bench(settings)
    document = orjson.loads((tmp_path / "results.json").read_bytes())
    rows = {r["strategy"]: r for r in document["results"]}
    wait_all = rows["wait-all"]
    assert wait_all["aggregator_requests_mean"] == 1.0
    for name in ("staircase", "staircase-prefill"):
        row = rows[name]
        assert row["errors"] == 0
        assert row["aggregator_requests_mean"] > 1.0
        assert 0 < row["tokens_in_cached_mean"] < row["tokens_in_mean"]
        assert row["tokens_in_uncached_mean"] == pytest.approx(
            row["tokens_in_mean"] - row["tokens_in_cached_mean"], abs=0.2
        )
        timeline = document["timelines"][f"quick/{name}"]
        assert sum(1 for c in timeline["calls"] if c["role"] == "aggregator") > 1
    summary = (tmp_path / "summary.md").read_text()
    assert "aggregator requests" in summary
    assert (tmp_path / "timeline-quick.png").exists()
