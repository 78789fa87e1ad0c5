"""The inference-server launcher's process handling, with a stand-in server (Python's own
``http.server``) so that it runs without the ``real`` extra."""

from __future__ import annotations

import sys
import urllib.request

import pytest

from moa_stream.testing.llamacpp import InferenceServer, InferenceServerError

STAND_IN = [sys.executable, "-m", "http.server", "{port}", "--bind", "127.0.0.1"]


def test_starts_on_a_free_port_serves_and_stops() -> None:
    server = InferenceServer("stand-in", STAND_IN, ready_path="/")
    with server:
        assert server.running and server.port > 0
        assert server.base_url == f"http://127.0.0.1:{server.port}/v1"
        assert str(server.port) in server.command
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/", timeout=5) as resp:
            assert resp.status == 200
        assert '"GET / HTTP/1.1" 200' in server.log_text()
    assert not server.running
    server.stop()  # a second stop is harmless


async def test_async_with_and_kill() -> None:
    async with InferenceServer("stand-in", STAND_IN, ready_path="/") as server:
        pid = server.pid
        server.kill()
        assert not server.running
        assert server.pid == pid  # the process is kept for its exit status and log
    assert not server.running


def test_an_early_exit_is_an_error_with_the_log() -> None:
    argv = [sys.executable, "-c", "import sys; print('model file is broken'); sys.exit(3)"]
    server = InferenceServer("broken", argv, ready_path="/")
    with pytest.raises(InferenceServerError, match="exited with code 3") as info:
        server.start()
    assert "model file is broken" in str(info.value)
    server.stop()


def test_a_server_that_never_gets_ready_is_stopped() -> None:
    argv = [sys.executable, "-c", "import time; time.sleep(60)"]
    server = InferenceServer("silent", argv, ready_path="/", start_timeout=0.5)
    with pytest.raises(InferenceServerError, match="not ready after"):
        server.start()
    assert not server.running


def test_starting_twice_is_refused() -> None:
    server = InferenceServer("stand-in", STAND_IN, ready_path="/")
    with server, pytest.raises(InferenceServerError, match="already started"):
        server.start()
    assert not server.running
