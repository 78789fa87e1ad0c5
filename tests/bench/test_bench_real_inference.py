"""benchmarks/real_inference.py builds its tables from the runs it recorded: checked on
fabricated records, without llama-server."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "real_inference.py"


@pytest.fixture(scope="module")
def ri() -> ModuleType:
    spec = importlib.util.spec_from_file_location("real_inference", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("real_inference", module)
    spec.loader.exec_module(module)
    return module


# 40 words in eight sentences that each open differently.
LONG = " ".join(f"Sentence {n} says one thing." for n in range(8))


def _run(
    moa: str,
    question: str,
    answer: str,
    chunks: list[float],
    *,
    requests: int = 1,
    refs: list[float | None] | None = None,
    cached: int | None = None,
    error: str | None = None,
    finish: str | None = "stop",
) -> dict[str, Any]:
    usage: dict[str, Any] = {"prompt_tokens": 500, "completion_tokens": 60}
    if cached is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    return {
        "moa": moa,
        "question": question,
        "ttft_s": chunks[0] if chunks else None,
        "total_s": (chunks[-1] if chunks else 1.0) + 0.05,
        "chunk_times": chunks,
        "usage": usage,
        "answer": answer,
        "finish_reason": finish,
        "error": error,
        "aggregator_requests": requests,
        "answer_end_s": chunks[-1] if chunks else None,
        "reference_ends": refs or [],
    }


def test_the_rows_carry_latency_smoothness_integrity_and_cost(ri: ModuleType) -> None:
    policies = {"single": None, "staircase": "partial(2, min_tokens=8)"}
    runs = [
        _run("single", "q1", LONG, [0.1, 0.2, 0.3]),
        _run("single", "q2", LONG, [0.1, 0.2]),
        _run(
            "staircase",
            "q1",
            "The sky is blue. The sky is indeed blue, </draft>",
            [0.2, 0.3, 1.8, 1.9],
            requests=4,
            refs=[1.0, 5.0],
            cached=300,
            finish="length",
        ),
        _run("staircase", "q2", LONG, [0.2, 0.25], requests=2, cached=100),
        _run("staircase", "q2", "", [], error="APIError: upstream failed"),
    ]
    rows = {r["moa"]: r for r in ri.summarize(runs, policies)}
    stair = rows["staircase"]
    assert stair["runs"] == 3 and stair["failed"] == 1
    assert stair["ttft_p50_s"] == pytest.approx(0.2)
    assert stair["restarts_per_answer"] == pytest.approx(0.5)
    assert stair["markup_answers"] == 1 and stair["markup_examples"] == ["</draft>"]
    # 10 words against 40 while a proposer ran on to 5 s: ended early.
    assert stair["ended_early"] == 1 and stair["ended_early_known"] == 2
    assert stair["length_ratio_p50"] == pytest.approx((10 / 40 + 1.0) / 2)
    # Gaps 0.1, 1.5, 0.1 and 0.05; the longest per run 1.5 and 0.05.
    assert stair["gaps_over_1s"] == 1
    assert stair["longest_gap_max_s"] == pytest.approx(1.5)
    assert stair["itl_p50_s"] == pytest.approx(0.1)
    assert stair["aggregator_requests_p50"] == pytest.approx(3.0)
    assert stair["cached_tokens_p50"] == pytest.approx(200.0)
    # The restarted sentence is not fresh: 4 and 40 fresh words; one answer cut at the limit.
    assert stair["fresh_words_p50"] == pytest.approx(22.0)
    assert stair["cut_at_limit"] == 1 and stair["loops_per_answer"] == 0
    assert rows["single"]["cached_tokens_p50"] is None
    text = ri.markdown(
        {
            "date": "today",
            "command": "real_inference.py",
            "seconds": 1.0,
            "cores": 2,
            "load_before": "0",
            "load_after": "0",
            "llama_server": "test",
            "runs": 2,
            "questions": 2,
        },
        list(rows.values()),
    )
    row = (
        "| staircase | 0.50 | 0.00 | 1 of 2 | 1 of 2 | 25 (0.62x) | 22 | 1 | 1 of 2 "
        "| 500 / 200 | 3.0 |"
    )
    assert row in text
    assert "`</draft>`" in text
    assert "| single | `(the aggregator model alone)` | 2 | 0 |" in text


def test_a_loop_and_the_servers_system_prompt_count_against_an_answer(ri: ModuleType) -> None:
    template = (
        "{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
        "You are a helpful AI assistant named Tester, made by the test suite<|im_end|>\n' }}"
        "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] }}"
    )
    texts = ri.chat_template_texts(template)
    assert texts == ("You are a helpful AI assistant named Tester, made by the test suite",)
    looping = (
        "I am a helpful AI assistant named Tester. The fourth tip is to keep away from the "
        "glass of water at night. The fifth tip is to keep away from the glass of water at "
        "night. The sixth tip is to keep away from the glass of water at"
    )
    runs = [_run("single", "q", LONG, [0.1, 0.2]), _run("wait-all", "q", looping, [1.0, 1.1])]
    rows = {r["moa"]: r for r in ri.summarize(runs, {"single": None, "wait-all": "wait_all"})}
    assert rows["wait-all"]["loops_per_answer"] == 2
    assert rows["wait-all"]["markup_answers"] == 0  # not this server's template: not known
    (row,) = ri.summarize(runs, {"wait-all": "wait_all"}, prompt_texts=texts)
    assert row["markup_answers"] == 1
    assert row["markup_examples"] == ["a helpful AI assistant named Tester"]
    # The two repeated list items are not fresh: 8 + 14 of the 49 words are.
    assert row["words_p50"] == 49 and row["fresh_words_p50"] == 22


def test_old_records_without_the_new_fields_still_summarize(ri: ModuleType) -> None:
    old = {
        "moa": "single",
        "question": "q",
        "ttft_s": 0.1,
        "total_s": 1.0,
        "usage": {"prompt_tokens": 38},
        "answer": "An answer.",
    }
    (row,) = ri.summarize([old], {"single": None})
    assert row["itl_p50_s"] is None and row["aggregator_requests_p50"] is None
    assert "| single |" in ri.markdown(
        {
            "date": "d",
            "command": "c",
            "seconds": 1,
            "cores": 2,
            "load_before": "",
            "load_after": "",
            "llama_server": "",
            "runs": 1,
        },
        [row],
    )


def test_report_figures_and_questions(ri: ModuleType) -> None:
    report = {
        "agents": [
            {"role": "proposer", "layer": 0, "started_s": 0.0, "duration_s": 1.0},
            {"role": "proposer", "layer": 0, "started_s": 0.0, "duration_s": None},
            {"role": "aggregator", "layer": 1, "started_s": 0.2, "duration_s": 0.3},
            {"role": "aggregator", "layer": 1, "started_s": 0.5, "duration_s": 0.4},
        ]
    }
    figures = ri._report_figures(report)
    assert figures["aggregator_requests"] == 2
    assert figures["answer_end_s"] == pytest.approx(0.9)
    assert figures["reference_ends"] == [1.0, None]
    assert ri._report_figures(None)["aggregator_requests"] is None
    assert len(ri.QUESTIONS) >= 20
    assert ri.questions_for(5, 2) == [ri.QUESTIONS[i % 2] for i in range(5)]


def test_help_works(ri: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        ri.main(["--help"])
    assert exit_info.value.code == 0
    assert "--questions" in capsys.readouterr().out
