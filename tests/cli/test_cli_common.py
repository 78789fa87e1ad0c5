"""What every ``moa-stream`` command shares: --version, plain help, the logging options, and
stdout that carries only the command's output (logs go to stderr)."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import structlog

from moa_stream import __version__
from moa_stream._log_setup import configure_logging
from moa_stream.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"moa-stream {__version__}"


@pytest.mark.parametrize("command", ["demo", "chat", "sim", "serve", "bench"])
def test_every_command_has_plain_help_and_the_logging_options(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    assert "``" not in text and ":func:" not in text and ":class:" not in text
    for option in ("-v", "--log-level", "--log-format"):
        assert option in text, f"{command} lacks {option}"
    if "--config" in text:
        assert "--config FILE" in text, "one spelling of the config option"
    assert text.split("\n\n")[1].strip(), f"{command} has a description"


def test_console_and_json_formats_write_to_the_given_stream() -> None:
    out = io.StringIO()
    configure_logging(level="info", fmt="json", stream=out, secrets=["sk-secret-123"])
    structlog.get_logger("t").info("hello", key="sk-secret-123", n=1)
    structlog.get_logger("t").debug("hidden")
    line = orjson.loads(out.getvalue().splitlines()[0])
    assert line["event"] == "hello" and line["key"] == "[redacted]" and line["level"] == "info"
    assert "hidden" not in out.getvalue()
    out = io.StringIO()
    configure_logging(level="warning", fmt="console", stream=out)
    structlog.get_logger("t").warning("careful", n=2)
    assert "careful" in out.getvalue() and "n=2" in out.getvalue()
    assert not out.getvalue().lstrip().startswith("{")


def _run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "moa_stream.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def _dead_config(tmp_path: Path) -> Path:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "dead.toml"
    config.write_text(
        f'[providers.down]\nbase_url = "http://127.0.0.1:{port}/v1"\n'
        "retry = { max_attempts = 1 }\n"
        '[agents.gone]\nprovider = "down"\nmodel = "m"\n'
        '[moa.down]\npreset = "single"\naggregator = "gone"\n'
    )
    return config


def test_logs_go_to_stderr_never_into_the_answer(tmp_path: Path) -> None:
    config = _dead_config(tmp_path)
    result = _run(["chat", "--config", str(config), "hello"], tmp_path)
    assert result.returncode == 1
    assert result.stdout == "", "stdout carries only the answer"
    logs = [orjson.loads(ln) for ln in result.stderr.splitlines() if ln.startswith("{")]
    assert any(entry["event"] == "provider.failed" for entry in logs), result.stderr
    assert "error:" in result.stderr and "Traceback" not in result.stderr

    quiet = _run(["chat", "--config", str(config), "--log-level", "error", "hello"], tmp_path)
    assert "provider.failed" not in quiet.stderr
    assert "error:" in quiet.stderr


def test_demo_json_is_the_only_thing_on_stdout(tmp_path: Path) -> None:
    result = _run(["demo", "--json", "--moa", "single"], tmp_path)
    assert result.returncode == 0, result.stderr
    report = orjson.loads(result.stdout)
    assert [s["name"] for s in report["strategies"]] == ["single"]


def test_chat_reads_stdin_lines_and_exit_is_not_a_prompt(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "moa_stream.cli", "chat", "--moa", "single"],
        input="What is 2 + 2?\nexit\nThis line is never asked.\n",
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr
    summaries = [ln for ln in result.stderr.splitlines() if "TTFT" in ln]
    assert len(summaries) == 1, "one turn: `exit` ended the conversation"
    assert result.stdout.strip()
