"""``/policy`` in a chat: every invalid policy, whether the parser or the layer rejects it
(``quorum(9)`` of four proposers), is one line, and the conversation goes on."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.terminal import PtyProcess

from moa_stream.cli.chat import ChatSession
from moa_stream.config import Runtime, default_config


async def test_a_policy_the_layer_rejects_is_one_line_and_keeps_the_policy() -> None:
    err, out = io.StringIO(), io.StringIO()
    async with Runtime(default_config()) as runtime:
        session = ChatSession(runtime, "moa-quorum", err=err, out=out)
        before = repr(session.spec.layers[0].policy)
        for text in ("/policy quorum(9)", "/policy bogus", "/policy partial(5, min_tokens=1)"):
            at = len(err.getvalue())
            assert session.command(text)
            lines = err.getvalue()[at:].strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("invalid policy: "), lines
            assert repr(session.spec.layers[0].policy) == before
        assert "asks for 9 proposers" in err.getvalue()


@pytest.fixture
def chat(tmp_path: Path) -> Iterator[PtyProcess]:
    p = PtyProcess(["chat"], home=tmp_path)
    yield p
    p.close()


@pytest.mark.timeout(120)
def test_interactive_chat_survives_a_policy_with_too_many_proposers(chat: PtyProcess) -> None:
    chat.expect(r"you> ")
    chat.send("/policy quorum(9)\r")
    chat.expect(r"invalid policy: [^\r\n]*asks for 9 proposers")
    chat.expect(r"you> ")
    assert chat.proc.poll() is None, "the session must go on"
    assert "moa-stream chat: error" not in chat.output
    chat.send("/policy quorum(1)\r")
    chat.expect(r"policy quorum\(1\)")
    chat.send("exit\r")
    assert chat.wait() == 0
