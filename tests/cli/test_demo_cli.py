"""``moa-stream demo``: its help describes the MoAs it runs, a staircase row in its table comes
with a line saying why its figures differ, and a config error exits 2 as for serve and chat."""

from __future__ import annotations

from pathlib import Path

import pytest

from moa_stream.cli import main


def test_help_describes_the_staircase_it_runs(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "staircase" in text
    assert "starts once two proposers have answered" not in text


def test_a_config_error_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[moa.x]\naggregator = "nobody"\n')
    assert main(["demo", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moa-stream demo: error: ") and "bad.toml" in err


def test_unknown_moa_is_a_plain_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--moa", "nope"]) == 1


@pytest.mark.timeout(120)
def test_a_staircase_row_is_explained_under_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--moa", "staircase", "--log-level", "error"]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = next(i for i, line in enumerate(lines) if line.startswith("staircase "))
    note = lines[row + 1]
    assert "asked again at each step" in note and "prefix" in note, note
