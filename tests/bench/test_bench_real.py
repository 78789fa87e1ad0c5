"""Real-endpoint mode, exercised against the simulator as if it were a real endpoint."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from support.bench import MODELS

from moa_stream.bench import BenchSettings, arithmetic_questions, run_bench
from moa_stream.sim import SimServer
from moa_stream.sim.quiz import QUESTIONS

# The simulator fixture: the fast models of support.bench.
pytestmark = pytest.mark.moa_sim(*MODELS, seed=0)

CONFIG = """
[providers.upstream]
base_url = "{base_url}"
retry = {{ max_attempts = 2 }}

[agents.fast]
provider = "upstream"
model = "fast"

[agents.mid]
provider = "upstream"
model = "mid"

[agents.slow]
provider = "upstream"
model = "slow"

[agents.agg]
provider = "upstream"
model = "agg"

[moa.trio]
proposers = ["fast", "mid", "slow"]
aggregator = "agg"
"""


async def test_real_mode_against_a_config_endpoint(sim: SimServer, tmp_path: Path) -> None:
    config = tmp_path / "bench.toml"
    config.write_text(CONFIG.format(base_url=sim.base_url))
    # Questions the simulator knows (by their tag), so its answers can be scored exactly.
    questions = tmp_path / "questions.json"
    questions.write_bytes(
        orjson.dumps(
            [{"id": q.id, "text": f"[{q.id}] {q.text}", "answer": q.answer} for q in QUESTIONS[:3]]
        )
    )
    settings = BenchSettings(
        out=tmp_path / "out",
        config=config,
        questions=questions,
        strategies=("reference-moa", "quorum-2"),
        concurrency=2,
        plots=False,
    )
    output = await run_bench(settings)

    document = orjson.loads((tmp_path / "out" / "results.json").read_bytes())
    assert document["metadata"]["mode"].startswith("real endpoints")
    rows = document["results"]
    assert [(r["strategy"], r["scenario"]) for r in rows] == [
        ("reference-moa", "config:trio"),
        ("quorum-2", "config:trio"),
    ]
    for row in rows:
        assert row["requests"] == 3 and row["errors"] == 0
        assert row["oracle_ttft_p50_s"] is None  # no schedule to compare with
        assert 0.0 <= row["quality"] <= 1.0 and row["quality_n"] == 3
        assert row["ttft_p50_s"] <= row["total_p50_s"]
    # The simulator's answers to its own quiz carry "Answer: N": some must score.
    assert sum(r["quality"] for r in rows) > 0
    assert output.headline is not None and output.headline["scenario"] == "config:trio"
    proposer_records = [r for r in sim.records if r.model != "agg"]
    assert any(not r.stream for r in proposer_records) and any(r.stream for r in proposer_records)


def test_the_shipped_question_set_has_thirty_exact_answers() -> None:
    questions = arithmetic_questions()
    assert len(questions) == 30
    assert len({q.id for q in questions}) == 30
    assert all(isinstance(q.answer, int) and "Answer: <number>" in q.prompt for q in questions)
