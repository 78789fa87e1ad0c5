"""Helpers for the browser tests: a ``moa-stream serve`` process, headless Chromium, its log."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "tests" / "ui" / "playground.toml"
#: Screenshots land here (``build/`` is not committed); MOA_UI_ARTIFACTS overrides it.
ARTIFACTS = Path(os.environ.get("MOA_UI_ARTIFACTS", ROOT / "build" / "ui"))

# What Chromium needs on a machine without a display or outside network, as root.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1400,1000",
)


def find_executable(*names: str) -> str | None:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class Server:
    """A ``moa-stream serve`` process and what it wrote on stderr."""

    process: subprocess.Popen[bytes]
    url: str = ""
    lines: list[str] = field(default_factory=list)


@contextlib.contextmanager
def serve(config: Path | None, env: dict[str, str] | None = None) -> Iterator[Server]:
    """``moa-stream serve --port 0`` (on ``config``, or the embedded default), stopped with
    SIGTERM afterwards."""
    argv = [sys.executable, "-m", "moa_stream.cli", "serve", "--port", "0"]
    if config is not None:
        argv += ["--config", str(config)]
    process = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    server = Server(process)
    ready = threading.Event()

    def read() -> None:
        assert process.stderr is not None
        for raw in process.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            server.lines.append(line)
            with contextlib.suppress(orjson.JSONDecodeError):
                entry = orjson.loads(line)
                if isinstance(entry, dict) and entry.get("event") == "server.listening":
                    server.url = entry["url"]
                    ready.set()
        ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        if not ready.wait(30) or not server.url:
            raise RuntimeError("moa-stream serve did not start:\n" + "\n".join(server.lines))
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        reader.join(5)
        if process.stderr is not None:
            process.stderr.close()


def start_browser(chromium: tuple[str, str], profile: str) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium[0]
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=chromium[1]), options=options)


def page_errors(driver: Any) -> list[str]:
    """JavaScript errors (and console.error calls) the page logged since the last call.

    Failed requests are logged too; only the 401s the page expects (it then asks for a key)
    are let through, since a missing file or a 500 is a fault of the page or the server.
    """
    errors = []
    for entry in driver.get_log("browser"):
        if entry.get("level") != "SEVERE":
            continue
        message = str(entry.get("message", ""))
        if entry.get("source") == "network" and "status of 401" in message:
            continue
        errors.append(message)
    return errors
