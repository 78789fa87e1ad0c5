"""The terminal view's counts: tokens estimated from characters while streaming, marked so;
the provider's figure once a proposer is done; the report's status words."""

from __future__ import annotations

import io
from typing import cast

from moa_stream import MoA, estimate_tokens
from moa_stream._types import Usage
from moa_stream.cli.live import LiveView, one_line_summary
from moa_stream.engine.events import ProposerDelta, ProposerDone, ProposerStarted, RunReport


def _view() -> LiveView:
    # The spec is read only at a layer's decision, which these tests do not reach.
    return LiveView(cast(MoA, None), progress=io.StringIO(), answer=io.StringIO(), live=False)


def test_status_line_estimate_is_a_lower_bound_of_characters_and_chunks() -> None:
    # Characters / 4 unless the chunks say fewer tokens arrived (each holds at least one), so
    # the provider's figure at the end is never below what was shown.
    view = _view()
    view(ProposerStarted(0, 0, "a", 0.0))
    for _ in range(200):
        view(ProposerDelta(0, 0, "a", "xy", 0.1))
    assert view.status_line().strip() == f"a ~{estimate_tokens(400)} tok …"
    view(ProposerDelta(0, 0, "a", "y" * 400, 0.2))
    assert view.status_line().strip() == f"a ~{min(estimate_tokens(800), 201)} tok …"


def test_done_proposer_shows_its_providers_figure_and_the_report_status_word() -> None:
    view = _view()
    view(ProposerStarted(0, 0, "a", 0.0))
    view(ProposerStarted(0, 1, "b", 0.0))
    view(ProposerDelta(0, 0, "a", "x" * 40, 0.1))
    view(ProposerDone(0, 0, "a", "x" * 40, "stop", Usage(9, 13), 0.1, 0.3))
    view(ProposerDone(0, 1, "b", "", "stop", Usage(9, 2, estimated=True), 0.1, 0.4))
    assert view.state == {"a": "complete", "b": "complete"}
    assert view.status_line().strip() == "a 13 tok ✓   b ~2 tok ✓"
    progress = view.progress
    assert isinstance(progress, io.StringIO)
    assert "(13 tokens)" in progress.getvalue() and "(~2 tokens)" in progress.getvalue()


def test_summary_marks_estimated_usage() -> None:
    def report(usage: Usage) -> RunReport:
        return RunReport("hi", "agg", 0.1, None, 0.1, 0.2, usage, (), ())

    assert "· 1,234 tokens" in one_line_summary(report(Usage(1000, 234)))
    assert "· ~1,234 tokens" in one_line_summary(report(Usage(1000, 234, estimated=True)))
