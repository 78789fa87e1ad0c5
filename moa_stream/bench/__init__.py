"""Benchmarks: TTFT against quality and cost, measured on the simulator or real endpoints.

``moa-stream bench`` runs a matrix of strategies (:mod:`~moa_stream.bench.strategies`) over
scenarios (:mod:`~moa_stream.bench.scenarios`) and writes ``results.json``, ``summary.md`` and
plots. The same is available from Python::

    from pathlib import Path
    from moa_stream import _aio
    from moa_stream.bench import BenchSettings, run_bench

    output = _aio.run(run_bench(BenchSettings(out=Path("out"), quick=True)))

See ``docs/benchmarks.md`` for what is measured and how. The measures of an answer's integrity,
its stream's smoothness and its cost (:mod:`moa_stream.bench.integrity`) are pure and work on
any answer text and chunk times, from anywhere.
"""

from moa_stream.bench.baseline import ChatAPI, Endpoint, ReferenceMoA, run_reference
from moa_stream.bench.integrity import (
    PRICE_MODELS,
    Integrity,
    PriceModel,
    Smoothness,
    answer_integrity,
    bill,
    ended_early,
    stream_gaps,
)
from moa_stream.bench.oracle import RecordSchedule, oracle_ttft, ready_at, run_oracle
from moa_stream.bench.quality import BenchQuestion, arithmetic_questions, is_correct
from moa_stream.bench.report import CellResult, RunSample, headline, percentile, summarize
from moa_stream.bench.runner import BenchOutput, BenchSettings, run_bench, run_cell
from moa_stream.bench.scenarios import QUICK, SCENARIOS, Scenario
from moa_stream.bench.strategies import STRATEGIES, Lineup, Strategy, policy_strategy

__all__ = [
    "BenchOutput",
    "BenchQuestion",
    "BenchSettings",
    "CellResult",
    "ChatAPI",
    "Endpoint",
    "Integrity",
    "Lineup",
    "PRICE_MODELS",
    "PriceModel",
    "QUICK",
    "RecordSchedule",
    "ReferenceMoA",
    "RunSample",
    "SCENARIOS",
    "STRATEGIES",
    "Scenario",
    "Smoothness",
    "Strategy",
    "answer_integrity",
    "arithmetic_questions",
    "bill",
    "ended_early",
    "headline",
    "is_correct",
    "oracle_ttft",
    "percentile",
    "policy_strategy",
    "ready_at",
    "run_bench",
    "run_cell",
    "run_oracle",
    "run_reference",
    "stream_gaps",
    "summarize",
]
