"""One structured log line per request, with the figures that matter and never a key."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import aiohttp
import orjson
import pytest
import structlog
from structlog.testing import capture_logs
from support.requests import CHAT, body
from support.server import config, serving, stream

from moa_stream.server.logs import Redactor, configure_logging

KEY = "sk-live-0123456789abcdef"
WRONG = "sk-guess-fedcba9876543210"


async def test_one_line_per_request_and_no_key_in_any() -> None:
    async with serving(config(api_keys=(KEY,))) as srv, aiohttp.ClientSession() as session:
        good = {"Authorization": f"Bearer {KEY}"}
        with capture_logs() as logs:
            sse = await stream(session, srv.url, body(), headers=good)
            async with session.post(srv.url + CHAT, json=body(), headers=good) as resp:
                await resp.read()
            async with session.post(
                srv.url + CHAT, json=body(), headers={"Authorization": f"Bearer {WRONG}"}
            ) as resp:
                assert resp.status == 401
            async with session.post(srv.url + CHAT, data=b"[", headers=good) as resp:
                assert resp.status == 400
    requests = [e for e in logs if e["event"] == "request"]
    assert len(requests) == 4
    streamed, completed, unauthorized, malformed = requests
    assert streamed["request_id"] == sse.headers["X-Request-Id"]
    assert streamed["model"] == "fast" and streamed["stream"] is True
    assert streamed["status"] == 200 and streamed["outcome"] == "ok"
    for field in ("ttft_s", "time_to_quorum_s", "duration_s", "prompt_tokens", "completion_tokens"):
        assert streamed[field] > 0, field
    assert completed["stream"] is False and "ttft_s" not in completed
    assert unauthorized["status"] == 401 and unauthorized["outcome"] == "unauthorized"
    assert malformed["status"] == 400 and malformed["error_code"] == "invalid_json"
    # No per-token lines: everything logged is one of the request lines (or engine debug).
    assert all(e["event"] == "request" or e["log_level"] == "debug" for e in logs)
    text = repr(logs)
    assert KEY not in text and WRONG not in text


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.reset_defaults()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("aiohttp.access").disabled = False


def test_configured_output_is_json_lines_with_secrets_masked(restore_logging: None) -> None:
    out = io.StringIO()
    configure_logging(level="info", stream=out, secrets=[KEY])
    log = structlog.get_logger("test")
    log.info("request", request_id="r1", note=f"header was Bearer {KEY}", nested={"k": [KEY]})
    log.debug("hidden")
    logging.getLogger("aiohttp.server").error("stdlib says %s", KEY)
    lines = [orjson.loads(line) for line in out.getvalue().splitlines()]
    assert [line["event"] for line in lines] == ["request", f"stdlib says {'[redacted]'}"]
    first, second = lines
    assert first["level"] == "info" and "timestamp" in first
    assert first["note"] == "header was Bearer [redacted]"
    assert first["nested"] == {"k": ["[redacted]"]}
    assert second["level"] == "error" and second["logger"] == "aiohttp.server"
    assert KEY not in out.getvalue()


def test_redactor_masks_the_longest_secret_first() -> None:
    redact = Redactor(["abc", "abcdef", ""])
    assert redact(None, "info", {"event": "x abcdef y abc"}) == {
        "event": "x [redacted] y [redacted]"
    }
    assert Redactor([])(None, "info", {"event": "abc"}) == {"event": "abc"}


def test_server_and_command_logging_are_one_set_up() -> None:
    # The server's entry point is the commands' JSON set-up: the same line for the same call,
    # and the same clear error for a level neither knows.
    from moa_stream._log_setup import configure_logging as configure_for_commands

    lines = []
    for configure in (
        lambda out: configure_logging(level="info", stream=out, secrets=[KEY]),
        lambda out: configure_for_commands(level="info", fmt="json", stream=out, secrets=[KEY]),
    ):
        out = io.StringIO()
        configure(out)
        structlog.get_logger().info("probe", detail=f"key {KEY}")
        line = orjson.loads(out.getvalue())
        del line["timestamp"]
        lines.append(line)
    assert lines[0] == lines[1] and KEY not in str(lines[0])
    with pytest.raises(ValueError, match="loud"):
        configure_logging(level="loud")


async def test_a_run_failed_on_a_config_mistake_logs_the_field_to_check() -> None:
    """A refused connection fails the run with a 502; its log line (never the client's body)
    names the provider field to check, as ``chat`` and ``demo`` do."""
    import socket

    from moa_stream.config import loads_config

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg = loads_config(
        f"""
[providers.local]
base_url = "http://127.0.0.1:{port}/v1"
retry = {{ max_attempts = 1 }}

[agents.solo]
provider = "local"
model = "m"

[moa.solo]
preset = "single"
aggregator = "solo"
""",
        "<test>",
    )
    async with serving(cfg) as srv, aiohttp.ClientSession() as session:
        with capture_logs() as logs:
            async with session.post(srv.url + CHAT, json=body(model="solo")) as resp:
                assert resp.status == 502
                answer = await resp.text()
    (line,) = [e for e in logs if e["event"] == "request"]
    assert line["hint"] == f"check providers.local.base_url (http://127.0.0.1:{port}/v1)"
    assert "providers.local" not in answer
