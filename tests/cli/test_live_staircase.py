"""The terminal view of a staircase run: its proposers go on writing while the answer streams,
so the status line goes on moving (below the answer on a shared terminal) and settles after it;
a count never goes down when the provider's figure replaces the estimate; log lines never land
inside the live line or the answer."""

from __future__ import annotations

import io
import re
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import cast

import pytest
import structlog

from moa_stream import MoA
from moa_stream._exceptions import AggregatorError
from moa_stream._log_setup import configure_logging
from moa_stream._types import Usage
from moa_stream.cli.demo import stream_run
from moa_stream.cli.live import LiveView
from moa_stream.engine.events import (
    AggregatorDelta,
    Event,
    LayerDone,
    ProposerDelta,
    ProposerDone,
    ProposerStarted,
    ReferenceInfo,
    RunDone,
    RunReport,
)

CONTROL = re.compile(r"\x1b\[([0-9;]*)([A-Za-z])|\x1b([78D])|([\r\n])|([^\x1b\r\n]+)")


def screen(text: str, width: int = 200) -> list[str]:
    """What a VT100 terminal shows after ``text``: the sequences the view uses, on a screen
    that grows downwards instead of scrolling."""
    rows: list[list[str]] = [[]]
    r = c = 0
    saved = (0, 0)

    def down() -> None:
        nonlocal r
        r += 1
        if r == len(rows):
            rows.append([])

    for m in CONTROL.finditer(text):
        arg, csi, esc, ctl, plain = m.groups()
        if plain:
            for ch in plain:
                if c >= width:
                    c = 0
                    down()
                row = rows[r]
                row.extend(" " * (c + 1 - len(row)))
                row[c] = ch
                c += 1
        elif ctl == "\r":
            c = 0
        elif ctl == "\n":
            c = 0  # the tty's onlcr: a newline returns too
            down()
        elif esc == "D":
            down()
        elif esc == "7":
            saved = (r, c)
        elif esc == "8":
            r, c = saved
        elif csi == "K":
            del rows[r][c:]
        elif csi == "J":
            del rows[r][c:]
            del rows[r + 1 :]
        elif csi == "A":
            r = max(0, r - int(arg or 1))
    return ["".join(row).rstrip() for row in rows]


@pytest.fixture(autouse=True)
def _every_delta_redraws(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("moa_stream.cli.live._REDRAW_EVERY", 0.0)


def _staircase_spec() -> MoA:
    layer = SimpleNamespace(stragglers="cancel")
    return cast(MoA, SimpleNamespace(staircase=object(), layers=(layer,)))


def _report() -> RunReport:
    return RunReport("answer", "agg", 0.1, 0.1, 0.1, 1.0, Usage(1, 1), (), ())


def _start(view: LiveView) -> None:
    view(ProposerStarted(0, 0, "a", 0.0))
    view(ProposerStarted(0, 1, "b", 0.0))
    view(ProposerDelta(0, 0, "a", "word " * 8, 0.1))
    refs = (ReferenceInfo("a", 0, "partial", 40, 8),)
    view(LayerDone(0, "deadline", refs, None, None, 0.5))


def test_staircase_status_keeps_moving_while_the_answer_streams() -> None:
    out = io.StringIO()
    view = LiveView(_staircase_spec(), progress=out, answer=out, live=True, verbose=False)
    _start(view)
    view(AggregatorDelta("The answer ", 0.6))
    before = len(out.getvalue())
    view(ProposerDelta(0, 1, "b", "more text " * 4, 0.7))
    view(ProposerDone(0, 1, "b", "more text " * 4, "stop", Usage(5, 9), 0.1, 0.8))
    drawn = out.getvalue()[before:]
    assert "b 9 tok ✓" in drawn, "the status line below the answer shows b's progress"
    shown = screen(out.getvalue())
    assert shown[-2:] == ["The answer", "  a ~1 tok …   b 9 tok ✓"], shown
    view(AggregatorDelta("goes on.", 0.9))
    view(RunDone(_report(), 1.0))
    # The answer is whole, and the final status line comes after it, as a line of its own.
    assert screen(out.getvalue())[-3:] == ["The answer goes on.", "  a ~1 tok …   b 9 tok ✓", ""]


def test_staircase_status_moves_after_the_layer_moved_on() -> None:
    out = io.StringIO()
    view = LiveView(_staircase_spec(), progress=out, answer=io.StringIO(), live=True)
    _start(view)
    before = len(out.getvalue())
    view(ProposerDelta(0, 1, "b", "x" * 40, 0.6))
    assert "b ~" in out.getvalue()[before:] and "b ~0 tok" not in out.getvalue()[before:]


def test_a_count_never_goes_down_when_the_providers_figure_arrives() -> None:
    out = io.StringIO()
    view = LiveView(_staircase_spec(), progress=out, answer=io.StringIO(), live=True)
    view(ProposerStarted(0, 0, "a", 0.0))
    shown: list[int] = []
    # 91 tokens of long words: 520 characters, more than 91 * 4.
    for i in range(91):
        view(ProposerDelta(0, 0, "a", "abcdef", 0.01 * i))
        shown.append(int(re.findall(r"a ~?(\d+) tok", view.status_line())[-1]))
    view(ProposerDone(0, 0, "a", "abcdef" * 91, "stop", Usage(10, 91), 0.1, 1.0))
    shown.append(int(re.findall(r"a ~?(\d+) tok", view.status_line())[-1]))
    assert shown[-1] == 91
    assert shown == sorted(shown), f"a count went down: {shown[-3:]}"


def test_a_warning_clears_the_live_line_and_it_is_drawn_again_after() -> None:
    terminal = io.StringIO()
    configure_logging(level="warning", fmt="console", stream=terminal)
    view = LiveView(_staircase_spec(), progress=terminal, answer=io.StringIO(), live=True)
    view(ProposerStarted(0, 0, "a", 0.0))
    view(ProposerDelta(0, 0, "a", "some words", 0.1))
    structlog.get_logger("moa_stream.providers").warning("provider.failed", attempts=3)
    # The line is erased before the warning, which is a line of its own, and drawn again.
    warning, status = screen(terminal.getvalue())
    assert "provider.failed" in warning and "tok" not in warning, warning
    assert status == "  a ~1 tok …"


def test_a_warning_during_a_shared_answer_waits_for_its_end() -> None:
    terminal = io.StringIO()
    configure_logging(level="warning", fmt="console", stream=terminal)
    view = LiveView(_staircase_spec(), progress=terminal, answer=terminal, live=True)
    _start(view)
    view(AggregatorDelta("The answer ", 0.6))
    structlog.get_logger("moa_stream.providers").warning("provider.failed", attempts=3)
    view(AggregatorDelta("goes on.", 0.9))
    assert "provider.failed" not in terminal.getvalue()
    view(RunDone(_report(), 1.0))
    text = terminal.getvalue()
    assert text.index("provider.failed") > text.index("goes on.")


class _FailingRun:
    """A run that streams part of an answer, then fails."""

    report: RunReport

    def __init__(self) -> None:
        self.report = _report()

    async def __aenter__(self) -> _FailingRun:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def events(self) -> AsyncIterator[Event]:
        yield ProposerStarted(0, 0, "a", 0.0)
        yield ProposerDelta(0, 0, "a", "some words", 0.1)
        refs = (ReferenceInfo("a", 0, "partial", 10, 2),)
        yield LayerDone(0, "deadline", refs, None, None, 0.5)
        yield AggregatorDelta("The answer ", 0.6)
        structlog.get_logger("moa_stream.providers").warning("provider.failed", attempts=1)
        raise AggregatorError("aggregator agg failed at step 2 of its answer")


async def test_a_failed_run_writes_the_log_lines_it_held_back() -> None:
    terminal = io.StringIO()
    configure_logging(level="warning", fmt="console", stream=terminal)
    spec = SimpleNamespace(
        staircase=object(),
        layers=(SimpleNamespace(stragglers="cancel"),),
        stream=lambda messages: _FailingRun(),
    )
    view = LiveView(cast(MoA, spec), progress=terminal, answer=terminal, live=True)
    with pytest.raises(AggregatorError):
        await stream_run(cast(MoA, spec), [{"role": "user", "content": "q"}], view)
    assert "provider.failed" in terminal.getvalue()
    assert "tok" not in screen(terminal.getvalue())[-2], "no live line left behind"
