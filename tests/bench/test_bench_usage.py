"""Token counts in the bench tables say when part of them is an estimate, not a server's count."""

from __future__ import annotations

import io
from pathlib import Path

import orjson
import pytest
from support.bench import DUO_CONFIG, MODELS

from moa_stream.bench import BenchSettings, run_bench
from moa_stream.bench.report import ESTIMATED_MARK, CellResult, RunSample, render_table, summarize
from moa_stream.sim import LatencyProfile, SimModel, SimServer

pytestmark = pytest.mark.moa_sim(*MODELS, seed=0)


def _sample(index: int, estimated: bool) -> RunSample:
    return RunSample(
        index=index,
        question_id=f"q{index}",
        ttft_s=0.5,
        total_s=1.0,
        prompt_tokens=100,
        completion_tokens=20,
        refs_complete=2,
        refs_partial=0,
        refs_failed=0,
        correct=True,
        tokens_estimated=estimated,
    )


def _cell(strategy: str, estimated: list[bool]) -> CellResult:
    samples = [_sample(i, e) for i, e in enumerate(estimated)]
    return CellResult(strategy, "", "wait_all", "s", 1, 1, samples, 1.0, 0.1)


def test_a_row_with_estimated_usage_is_marked_and_the_legend_says_in_how_many_runs() -> None:
    marked = summarize(_cell("quorum-1", [True, False, True]))
    exact = summarize(_cell("wait-all", [False, False, False]))
    assert marked["tokens_estimated_runs"] == 2 and exact["tokens_estimated_runs"] == 0
    table = render_table([marked, exact])
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()}
    assert ESTIMATED_MARK in rows["quorum-1"] and ESTIMATED_MARK not in rows["wait-all"]
    legend = table.splitlines()[-1]
    assert legend.startswith(ESTIMATED_MARK) and "quorum-1 2 of 3" in legend
    assert "wait-all" not in legend


def test_results_written_before_the_field_render_unmarked() -> None:
    old = summarize(_cell("wait-all", [True]))
    del old["tokens_estimated_runs"]
    table = render_table([old])
    assert ESTIMATED_MARK not in table
    assert len(table.splitlines()) == 3  # header, rule, one row: no legend


async def _bench(tmp_path: Path, sim: SimServer, aggregator: str) -> dict:
    config = tmp_path / f"{aggregator}.toml"
    config.write_text(DUO_CONFIG.format(base_url=sim.base_url, aggregator=aggregator))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Why is the sky blue?\nName a prime number.\n")
    out = tmp_path / aggregator
    settings = BenchSettings(
        out=out, config=config, prompts=prompts, strategies=("wait-all",), plots=False
    )
    await run_bench(settings, io.StringIO())
    (row,) = orjson.loads((out / "results.json").read_bytes())["results"]
    return {"row": row, "summary": (out / "summary.md").read_text()}


async def test_an_aggregator_that_sends_no_usage_marks_the_bench_row(
    tmp_path: Path, sim: SimServer
) -> None:
    fast = LatencyProfile.fixed(ttft=0.01, tokens_per_s=800.0)
    sim.add_model(SimModel("quiet", latency=fast, answer_tokens=8, sends_usage=False))
    counted = await _bench(tmp_path, sim, "agg")
    assert counted["row"]["tokens_estimated_runs"] == 0
    assert ESTIMATED_MARK not in counted["summary"]
    guessed = await _bench(tmp_path, sim, "quiet")
    assert guessed["row"]["tokens_estimated_runs"] == guessed["row"]["requests"] == 2
    assert ESTIMATED_MARK in guessed["summary"]
