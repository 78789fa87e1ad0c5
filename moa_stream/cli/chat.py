"""moa-stream chat: a conversation with a MoA in the terminal.

Without --config it uses the embedded simulated config, like demo and serve. The answer goes to
stdout as it arrives; the proposers' live progress, the one-line summary of each turn and any
error go to stderr. Commands: /help, /moa ID, /policy TEXT, /reset, /stats, /exit (or exit,
quit, Ctrl-D). Ctrl-C during an answer cancels that answer, and every upstream request of it,
and returns to the prompt; a failed turn prints one line and keeps the conversation.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO

from moa_stream import _aio
from moa_stream._exceptions import ConfigError, MoAStreamError
from moa_stream._probe import check_at_start, hint_for
from moa_stream._types import ChatMessage
from moa_stream.cli._common import add_config_arguments, add_documented_command, exit_on_error
from moa_stream.cli.demo import render_table, stream_run, summary_row
from moa_stream.cli.live import LiveView, one_line_summary
from moa_stream.config import Config, Runtime, default_config, load_config
from moa_stream.engine.policies import parse_policy
from moa_stream.engine.spec import MoA

__all__ = ["add_parser", "run"]

PROMPT = "you> "
HISTORY_FILE = "~/.moa_stream_history"
HELP = """commands:
  /moa [ID]       switch to another MoA of the config (without ID: list them)
  /policy [TEXT]  set the current MoA's layer policy, e.g. /policy quorum(2) | deadline(1.5)
  /reset          forget the conversation so far
  /stats          show a table of timings after each answer (again: one line)
  /exit           leave (also: exit, quit, Ctrl-D)
Ctrl-C cancels the answer being written."""


@dataclass
class ChatSession:
    """The conversation and the MoA it talks to; one :meth:`turn` per user message."""

    runtime: Runtime
    moa_id: str
    err: IO[str]
    out: IO[str]
    stats: bool = False
    history: list[ChatMessage] = field(default_factory=list)
    spec: MoA = field(init=False)

    def __post_init__(self) -> None:
        self.spec = self.runtime.moas[self.moa_id]

    def say(self, text: str) -> None:
        self.err.write(text + "\n")
        self.err.flush()

    # -- commands ----------------------------------------------------------------------------
    def command(self, line: str) -> bool:
        """Handle a ``/command``; False when the user asked to leave."""
        name, _, arg = line.strip().partition(" ")
        arg = arg.strip()
        if name in ("/exit", "/quit"):
            return False
        if name == "/help":
            self.say(HELP)
        elif name == "/reset":
            self.history.clear()
            self.say("(conversation cleared)")
        elif name == "/stats":
            self.stats = not self.stats
            self.say(f"(after each answer: {'a table' if self.stats else 'one line'})")
        elif name == "/moa":
            if not arg:
                self.say("MoAs: " + ", ".join(self.runtime.moas) + f" (now: {self.moa_id})")
            elif arg not in self.runtime.moas:
                self.say(f"unknown MoA {arg!r}; known: {', '.join(self.runtime.moas)}")
            else:
                self.moa_id, self.spec = arg, self.runtime.moas[arg]
                self.say(f"(now talking to {arg}: {self.describe()})")
        elif name == "/policy":
            self._policy(arg)
        else:
            self.say(f"unknown command {name}; /help lists them")
        return True

    def describe(self) -> str:
        if not self.spec.layers:
            return "a single model, no proposers"
        return f"policy {self.spec.layers[0].policy!r}"

    def _policy(self, text: str) -> None:
        if not text:
            self.say(f"({self.moa_id}: {self.describe()})")
            return
        if not self.spec.layers:
            self.say(f"{self.moa_id} has no proposers, so no policy; /moa switches MoA")
            return
        try:
            policy = parse_policy(text)
            # The layer checks the policy against its proposers (``quorum(9)`` of three is
            # rejected there, not by the parser): a mistake either way is one line, and the
            # conversation goes on with the policy it had.
            spec = self.spec.with_policy(policy)
        except (ConfigError, ValueError) as exc:
            self.say(f"invalid policy: {exc}")
            return
        self.spec = spec
        self.say(f"({self.moa_id}: policy {policy!r})")

    # -- one turn ----------------------------------------------------------------------------
    async def turn(self, text: str, view: LiveView) -> bool:
        """Ask ``text``; True when an answer came. The history keeps only answered turns."""
        messages: list[ChatMessage] = [*self.history, {"role": "user", "content": text}]
        try:
            report = await stream_run(self.spec, messages, view)
        except MoAStreamError as exc:
            view.clear()
            hint = hint_for(exc, self.runtime.config)
            self.say(f"error: {exc}" + (f"; {hint}" if hint else ""))
            return False
        if report.error:
            self.say(f"error: {report.error}")
            return False
        self.history += [
            {"role": "user", "content": text},
            {"role": "assistant", "content": report.text},
        ]
        if self.stats:
            self.say(render_table([summary_row(self.moa_id, self.spec, report)]))
        else:
            self.say("  " + one_line_summary(report))
        return True

    def view(self) -> LiveView:
        return LiveView(
            self.spec, progress=self.err, answer=self.out, live=self.err.isatty(), verbose=False
        )


@contextlib.contextmanager
def _line_editing() -> Iterator[None]:
    """Arrow keys and history (saved across sessions) where readline exists."""
    try:
        import readline
    except ImportError:  # pragma: no cover - Windows without pyreadline
        yield
        return
    path = os.path.expanduser(HISTORY_FILE)
    with contextlib.suppress(OSError):
        readline.read_history_file(path)
    readline.set_history_length(1000)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            readline.write_history_file(path)


def _read_line(interactive: bool) -> str:
    """One line from the user; EOFError at the end of input."""
    if not interactive:
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\n")
    if sys.stdout.isatty():
        return input(PROMPT)
    # stdout is redirected: the prompt goes where the user can see it, not into the file.
    sys.stderr.write(PROMPT)
    sys.stderr.flush()
    return input()


def _is_leave(text: str) -> bool:
    return text.strip().lower() in ("exit", "quit", "/exit", "/quit")


def _conversation(runner: asyncio.Runner, session: ChatSession, interactive: bool) -> int:
    failed = 0
    while True:
        try:
            text = _read_line(interactive)
        except EOFError:
            if interactive:
                (sys.stdout if sys.stdout.isatty() else sys.stderr).write("\n")
            break
        except KeyboardInterrupt:
            # At the prompt, Ctrl-C drops the line being typed, as a shell does.
            sys.stderr.write("\n")
            continue
        if not text.strip():
            continue
        if _is_leave(text):
            break
        if text.startswith("/"):
            if not session.command(text):
                break
            continue
        view = session.view()
        try:
            ok = runner.run(session.turn(text, view))
        except KeyboardInterrupt:
            # asyncio.Runner turned Ctrl-C into a cancellation of the turn: the run's
            # `async with` closed every upstream request before this line runs.
            view.clear()
            session.out.write("\n")
            session.out.flush()
            session.say("(answer cancelled)")
            continue
        failed += not ok
    return 1 if failed and not interactive else 0


def _chat(args: argparse.Namespace) -> int:
    config: Config = load_config(args.config) if args.config else default_config()
    moa_id = args.moa or ("moa-quorum" if "moa-quorum" in config.moas else next(iter(config.moas)))
    if moa_id not in config.moas:
        raise MoAStreamError(f"unknown MoA {moa_id!r}; known: {', '.join(config.moas)}")
    interactive = args.prompt is None and sys.stdin.isatty()
    with asyncio.Runner(loop_factory=_aio.loop_factory()) as runner:
        if not runner.run(check_at_start(config, "chat", fatal=args.check)):
            return 1
        runtime = Runtime(config)
        try:
            runner.run(runtime.__aenter__())
            session = ChatSession(runtime, moa_id, err=sys.stderr, out=sys.stdout, stats=args.stats)
            if args.prompt is not None:
                return 0 if runner.run(session.turn(args.prompt, session.view())) else 1
            if interactive:
                session.say(
                    f"Talking to {moa_id} ({session.describe()}). "
                    "/help for commands, Ctrl-D to leave."
                )
                with _line_editing():
                    return _conversation(runner, session, interactive)
            return _conversation(runner, session, interactive)
        finally:
            runner.run(runtime.aclose())


def run(args: argparse.Namespace) -> int:
    """The ``chat`` command. A configuration error is one line and exit 2, a start-up error
    one line and exit 1."""
    return exit_on_error("chat", lambda: _chat(args))


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the ``chat`` sub-command."""
    chat = add_documented_command(
        sub, "chat", "chat with a MoA in the terminal (default: simulated models)", __doc__
    )
    chat.add_argument(
        "prompt", nargs="?", help="ask one message and exit (default: a conversation)"
    )
    chat.add_argument(
        "--moa", metavar="ID", help="the config's MoA to talk to (default: moa-quorum or the first)"
    )
    chat.add_argument("--model", dest="moa", help=argparse.SUPPRESS)  # the option's former name
    chat.add_argument(
        "--stats", action="store_true", help="a table of timings after each answer, not one line"
    )
    add_config_arguments(chat)
    chat.set_defaults(func=run)
