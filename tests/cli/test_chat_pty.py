"""``moa-stream chat`` in a pseudo-terminal, as a user runs it: no flags needed, Ctrl-C cancels
an answer and not the session, a failed turn is one line, exit/quit/Ctrl-D leave."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.terminal import PtyProcess

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[type[PtyProcess]]:
    started: list[PtyProcess] = []

    def make(args: list[str]) -> PtyProcess:
        p = PtyProcess(args, home=tmp_path)
        started.append(p)
        return p

    yield make  # type: ignore[misc]
    for p in started:
        p.close()


def test_chat_without_flags_survives_ctrl_c_mid_answer(spawn) -> None:  # type: ignore[no-untyped-def]
    chat = spawn(["chat"])
    chat.expect(r"Talking to moa-quorum")
    chat.expect(r"you> ")
    chat.send("What is 6 times 7?\r")
    # The live status line of the proposers: the run is under way, no answer yet (the default
    # MoA waits for two proposers, over a second on the simulator).
    chat.expect(r"small-fast ~?[\d,]+ tok")
    chat.send("\x03")
    chat.expect(r"\(answer cancelled\)")
    chat.expect(r"you> ")
    assert chat.proc.poll() is None, "Ctrl-C during an answer must not end the session"
    # The session goes on: a policy command, then a whole answer with its one-line summary.
    chat.send("/policy quorum(1)\r")
    chat.expect(r"policy quorum\(1\)")
    chat.send("And 7 times 8?\r")
    chat.expect(r"TTFT \d+\.\d+ s · total \d+\.\d+ s · ~?[\d,]+ tokens")
    chat.expect(r"you> ")
    # `exit` is a command, not a prompt: the session ends, cleanly.
    chat.send("exit\r")
    assert chat.wait() == 0


def test_chat_ctrl_d_leaves_a_newline(spawn) -> None:  # type: ignore[no-untyped-def]
    chat = spawn(["chat"])
    chat.expect(r"you> ")
    chat.send("\x04")
    assert chat.wait() == 0
    assert chat.output.rsplit("you> ", 1)[1].startswith(("\n", "\r\n")), chat.output


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_chat_failed_turn_is_one_line_and_the_session_goes_on(spawn, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    config = tmp_path / "chat.toml"
    config.write_text(
        f"""
[providers.sim]
kind = "sim"

[providers.down]
base_url = "http://127.0.0.1:{_dead_port()}/v1"
retry = {{ max_attempts = 1 }}
timeouts = {{ connect = 2 }}

[agents.fast]
provider = "sim"
model = "small-fast"

[agents.gone]
provider = "down"
model = "nothing"

[moa.down]
preset = "single"
aggregator = "gone"

[moa.up]
preset = "single"
aggregator = "fast"
"""
    )
    chat = spawn(["chat", "--config", str(config), "--moa", "down"])
    chat.expect(r"you> ")
    chat.send("hello\r")
    error = chat.expect(r"error: [^\r\n]+")
    assert "Traceback" not in chat.output
    assert "gone" in error or "connect" in error.lower(), error
    chat.expect(r"you> ")
    chat.send("/moa up\r")
    chat.expect(r"now talking to up")
    chat.send("hello again\r")
    chat.expect(r"TTFT \d+\.\d+ s")
    chat.expect(r"you> ")
    chat.send("quit\r")
    assert chat.wait() == 0


async def test_ctrl_c_closes_the_upstream_request_of_the_answer(spawn, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from moa_stream.sim import LatencyProfile, SimModel, SimServer

    models = [
        SimModel("p1", latency=LatencyProfile.fixed(ttft=0.02, tokens_per_s=400), answer_tokens=5),
        # An answer of about forty seconds: Ctrl-C always lands in the middle of it.
        SimModel(
            "agg", latency=LatencyProfile.fixed(ttft=0.02, tokens_per_s=50), answer_tokens=2000
        ),
    ]
    async with SimServer(models=models, seed=0) as sim:
        config = tmp_path / "slow.toml"
        config.write_text(
            f'[providers.up]\nbase_url = "{sim.base_url}"\n'
            '[agents.p1]\nprovider = "up"\nmodel = "p1"\n'
            '[agents.agg]\nprovider = "up"\nmodel = "agg"\n'
            '[moa.slow]\nproposers = ["p1"]\naggregator = "agg"\n'
        )
        chat = spawn(["chat", "--config", str(config)])
        await asyncio.to_thread(chat.expect, r"you> ")
        chat.send("Tell me a long story.\r")
        for _ in range(600):  # until the answer streams
            agg = [r for r in sim.records if r.model == "agg" and r.first_token_sent_at]
            if agg:
                break
            await asyncio.sleep(0.05)
        assert agg, "the aggregator never started answering"
        assert sim.active_streams == 1
        chat.send("\x03")
        await asyncio.to_thread(chat.expect, r"\(answer cancelled\)")
        await sim.wait_idle(10)
        assert sim.active_streams == 0, "the cancelled answer's upstream stream was closed"
        assert agg[0].completion_tokens < 2000
        assert chat.proc.poll() is None
        chat.send("/exit\r")
        assert await asyncio.to_thread(chat.wait) == 0
