"""What ``moa-stream bench`` tells its user: matplotlib checked before the matrix runs, skipped
strategies counted and explained, no "best" when quality cannot separate the strategies, a loud
warning when the judge's replies don't parse."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import orjson
import pytest
from support.bench import DUO_CONFIG, MODELS

from moa_stream import cli
from moa_stream.bench import BenchSettings, run_bench
from moa_stream.bench._progress import Progress
from moa_stream.bench.report import headline, headline_sentence
from moa_stream.sim import SimServer

# The simulator fixture: the fast models of support.bench.
pytestmark = pytest.mark.moa_sim(*MODELS, seed=0)


def test_without_matplotlib_bench_stops_before_running_and_names_no_plots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    out = tmp_path / "out"
    assert cli.main(["bench", "--quick", "--in-process", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "matplotlib" in err and "--no-plots" in err and "Traceback" not in err
    assert not out.exists(), "nothing ran"


def test_a_skipped_strategy_keeps_the_total_and_says_why() -> None:
    out = io.StringIO()
    progress = Progress(out, cells=3)
    progress.cell_started("quick", "reference-moa", 2)
    progress.cell_skipped("quorum-3 on quick", "at least 4 proposers")
    assert progress.cells == 3
    assert "[2/3] quorum-3 on quick: skipped, it needs at least 4 proposers" in out.getvalue()


def _row(strategy: str, ttft: float, quality: float | None, ci: list[float] | None) -> dict:
    return {
        "scenario": "s",
        "strategy": strategy,
        "policy": strategy,
        "ttft_p50_s": ttft,
        "quality": quality,
        "quality_ci95": ci,
    }


def test_no_best_is_named_when_every_strategy_scores_the_same() -> None:
    rows = [_row("reference-moa", 2.0, 0.0, [0, 0.3]), _row("quorum-2", 1.0, 0.0, [0, 0.3])]
    h = headline(rows, "s")
    assert h is not None and h["quality_separates"] is False
    text = headline_sentence(h)
    assert "no policy is named best" in text and "every strategy scored 0.0%" in text
    assert "best policy" not in text


def test_no_best_is_named_without_quality_figures() -> None:
    rows = [_row("reference-moa", 2.0, None, None), _row("quorum-2", 1.0, None, None)]
    h = headline(rows, "s")
    assert h is not None
    assert "cannot separate" in headline_sentence(h)
    assert "no quality was measured" in headline_sentence(h)


def test_a_difference_within_noise_is_called_so() -> None:
    rows = [
        _row("reference-moa", 2.0, 0.75, [0.41, 0.93]),
        _row("quorum-2", 1.0, 0.75 - 0.025, [0.39, 0.92]),
    ]
    h = headline(rows, "s")
    assert h is not None and h["quality_within_noise"] is True
    text = headline_sentence(h)
    assert "within noise" in text and "39-92%" in text
    assert "best" not in text
    clear = [
        _row("reference-moa", 2.0, 0.95, [0.93, 0.97]),
        _row("quorum-2", 1.0, 0.94, [0.92, 0.96]),
        _row("quorum-1", 0.5, 0.60, [0.55, 0.65]),
    ]
    h = headline(clear, "s")
    assert h is not None and h["strategy"] == "quorum-2"


async def test_a_judge_whose_replies_do_not_parse_gets_a_loud_warning(
    tmp_path: Path, sim: SimServer
) -> None:
    config = tmp_path / "bench.toml"
    config.write_text(DUO_CONFIG.format(base_url=sim.base_url, aggregator="agg"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Why is the sky blue?\nName a prime number.\n")
    progress = io.StringIO()
    settings = BenchSettings(
        out=tmp_path / "out",
        config=config,
        prompts=prompts,
        judge="mid",  # a simulated model: it answers with filler, never "Score: N"
        strategies=("reference-moa", "quorum-1"),
        concurrency=2,
        plots=False,
    )
    await run_bench(settings, progress)
    assert "WARNING: the judge 'mid' gave a usable 'Score: N' for none of 2" in progress.getvalue()
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "> **reference-moa: WARNING: the judge 'mid'" in summary
    assert "no policy is named best" in summary
    document = orjson.loads((tmp_path / "out" / "results.json").read_bytes())
    assert all(r["judge_score"] is None for r in document["results"])
