"""A chat session's conversation across turns: a failed turn is reported and leaves the history
as it was; the next turn sends the whole conversation."""

from __future__ import annotations

import io
import socket

from moa_stream.cli.chat import ChatSession
from moa_stream.config import Runtime, loads_config


def _config() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"""
[providers.sim]
kind = "sim"

[providers.down]
base_url = "http://127.0.0.1:{port}/v1"
retry = {{ max_attempts = 1 }}

[agents.fast]
provider = "sim"
model = "small-fast"

[agents.gone]
provider = "down"
model = "m"

[moa.up]
preset = "single"
aggregator = "fast"

[moa.down]
preset = "single"
aggregator = "gone"
"""


async def test_a_failed_turn_keeps_the_conversation_and_says_why_in_one_line() -> None:
    err, out = io.StringIO(), io.StringIO()
    async with Runtime(loads_config(_config())) as runtime:
        session = ChatSession(runtime, "up", err=err, out=out)
        assert await session.turn("first question", session.view())
        assert [m["role"] for m in session.history] == ["user", "assistant"]

        assert session.command("/moa down")
        failed_at = len(err.getvalue())
        assert not await session.turn("second question", session.view())
        assert session.history[0]["content"] == "first question"
        assert len(session.history) == 2, "the failed turn is not in the conversation"
        error_lines = err.getvalue()[failed_at:].strip().splitlines()
        assert len(error_lines) == 1 and error_lines[0].startswith("error: ")

        session.command("/moa up")
        assert await session.turn("third question", session.view())
        assert [m["content"] for m in session.history][::2] == ["first question", "third question"]
        records = [r for r in runtime.sim.records if r.model == "small-fast"]
        assert records[-1].prompt_tokens > records[0].prompt_tokens, "history was sent"

        session.command("/reset")
        assert session.history == []


async def test_policy_command_changes_the_policy_and_rejects_nonsense() -> None:
    err, out = io.StringIO(), io.StringIO()
    config = loads_config(
        _config()
        + '\n[agents.other]\nprovider = "sim"\nmodel = "medium"\n'
        + '[moa.pair]\nproposers = ["fast", "other"]\naggregator = "fast"\n'
    )
    async with Runtime(config) as runtime:
        session = ChatSession(runtime, "pair", err=err, out=out)
        session.command("/policy quorum(1)")
        assert repr(session.spec.layers[0].policy) == "quorum(1)"
        session.command("/policy quorum(")
        assert "invalid policy" in err.getvalue()
        assert repr(session.spec.layers[0].policy) == "quorum(1)"
        assert session.command("/bogus")
        assert "unknown command /bogus" in err.getvalue()
        assert not session.command("/exit")
