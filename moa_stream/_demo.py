"""``moa-stream demo`` and ``moa-stream chat``: run MoAs from the terminal, live.

``demo`` needs nothing: it starts the simulated upstream in-process and runs the default MoA
twice on one prompt, once waiting for every proposer (the original MoA) and once with an
early-start policy, then compares their timings. ``chat`` does the same against the real
endpoints of a config file, one MoA at a time, in a conversation.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from typing import IO, Any

import orjson

from moa_stream import _aio
from moa_stream._exceptions import MoAStreamError
from moa_stream._types import ChatMessage
from moa_stream.config import Config, Runtime, default_config, load_config
from moa_stream.engine.events import Event, RunReport
from moa_stream.engine.spec import MoA
from moa_stream.sim.quiz import extract_answer, find_question, get_question

__all__ = ["add_parser"]

# A quiz question of the simulator's (its models write a final "Answer: N" line, right or wrong
# with their configured accuracy), so the demo can show whether each answer is correct.
DEFAULT_PROMPT = get_question("Q7").prompt
DEMO_STRATEGIES = ("moa-wait-all", "staircase")


class Progress:
    """Shows a run as it happens: one status line of the proposers (redrawn in place on a
    terminal), layer decisions, then the answer streamed as it arrives."""

    def __init__(self, out: IO[str], live: bool) -> None:
        self.out = out
        self.live = live
        self.tokens: dict[str, int] = {}
        self.state: dict[str, str] = {}
        self.answering = False

    def _status_line(self) -> str:
        marks = {"running": "…", "done": "✓", "failed": "✗"}
        return "  " + "  ".join(
            f"{agent} {self.tokens[agent]}{marks[self.state[agent]]}" for agent in self.tokens
        )

    def __call__(self, event: Event) -> None:
        out = self.out
        if event.type == "proposer.started":
            self.tokens[event.agent] = 0
            self.state[event.agent] = "running"
        elif event.type == "proposer.delta":
            self.tokens[event.agent] += 1
            if self.live:
                out.write("\r" + self._status_line())
                out.flush()
        elif event.type in ("proposer.done", "proposer.failed"):
            self.state[event.agent] = "done" if event.type == "proposer.done" else "failed"
            if event.type == "proposer.failed":
                out.write(f"\r  proposer {event.agent} failed: {event.error}\n")
            elif not self.live:
                out.write(f"  proposer {event.agent} done at {event.t:.2f} s\n")
        elif event.type == "layer.done":
            refs = ", ".join(f"{r.agent} ({r.status})" for r in event.references) or "none"
            cut = f"; remaining layers cut ({event.cut})" if event.cut else ""
            prefix = "\r" + self._status_line() + "\n" if self.live else ""
            out.write(
                f"{prefix}  layer {event.layer} moved on at {event.t:.2f} s "
                f"({event.reason}) with {refs}{cut}\n"
            )
        elif event.type == "aggregator.started":
            out.write(f"  aggregator {event.agent} started at {event.t:.2f} s\n")
        elif event.type == "aggregator.failed":
            out.write(f"  aggregator {event.agent} failed: {event.error}\n")
        elif event.type == "aggregator.delta":
            if not self.answering:
                self.answering = True
                out.write(f"  first token at {event.t:.2f} s\n\n")
            out.write(event.text)
            out.flush()
        elif event.type == "run.done":
            out.write("\n\n")
        out.flush()


async def stream_run(
    spec: MoA, messages: Sequence[ChatMessage], progress: Progress | None
) -> RunReport:
    async with spec.stream(messages) as run:
        async for event in run.events():
            if progress is not None:
                progress(event)
    return run.report


def _fmt_s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def summary_row(
    name: str, spec: MoA, report: RunReport, prompt: str | None = None
) -> dict[str, Any]:
    policy = repr(spec.layers[0].policy) if spec.layers else "-"
    question = find_question(prompt) if prompt else None
    answer = extract_answer(report.text) if question is not None else None
    return {
        "name": name,
        "policy": policy,
        "ttft_s": report.ttft_s,
        "time_to_quorum_s": report.time_to_quorum_s,
        "aggregator_ttft_s": report.aggregator_ttft_s,
        "total_s": report.total_s,
        "tokens": report.usage.total_tokens,
        "prompt_tokens": report.usage.prompt_tokens,
        "completion_tokens": report.usage.completion_tokens,
        "references": [
            {"agent": r.agent, "status": r.status}
            for layer in report.layers
            for r in layer.references
        ],
        "layer_reasons": [layer.reason for layer in report.layers],
        "aggregator": report.aggregator,
        "answer": answer,
        "correct": None if question is None else answer == question.answer,
        "error": report.error,
        "text": report.text,
    }


def _fmt_answer(row: dict[str, Any]) -> str:
    if row["correct"] is None:
        return "-"
    return f"{row['answer']} ({'right' if row['correct'] else 'wrong'})"


def render_table(rows: Sequence[dict[str, Any]]) -> str:
    header = (
        "strategy",
        "policy",
        "TTFT",
        "to quorum",
        "agg TTFT",
        "total",
        "tokens in/out",
        "answer",
    )
    lines = [
        (
            r["name"],
            r["policy"],
            _fmt_s(r["ttft_s"]),
            _fmt_s(r["time_to_quorum_s"]),
            _fmt_s(r["aggregator_ttft_s"]),
            _fmt_s(r["total_s"]),
            f"{r['prompt_tokens']:,} / {r['completion_tokens']:,}",
            _fmt_answer(r),
        )
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*line) for line in lines]
    return "\n".join(out)


def comparison(rows: Sequence[dict[str, Any]]) -> str | None:
    if len(rows) < 2 or rows[0]["ttft_s"] is None or rows[1]["ttft_s"] is None:
        return None
    base, fast = rows[0], rows[1]
    gain = base["ttft_s"] - fast["ttft_s"]
    pct = 100.0 * gain / base["ttft_s"] if base["ttft_s"] else 0.0
    return (
        f"{fast['name']} showed its first token {gain:.2f} s sooner than {base['name']} "
        f"({pct:.0f}% lower TTFT)."
    )


async def _demo(args: argparse.Namespace) -> int:
    config: Config = load_config(args.config) if args.config else default_config()
    prompt = args.prompt or DEFAULT_PROMPT
    messages: list[ChatMessage] = [{"role": "user", "content": prompt}]
    names = (
        args.strategy or [n for n in DEMO_STRATEGIES if n in config.moas] or list(config.moas)[:2]
    )
    out = sys.stdout
    rows = []
    async with Runtime(config) as runtime:
        for name in names:
            if name not in runtime.moas:
                raise MoAStreamError(f"unknown MoA {name!r}; known: {', '.join(runtime.moas)}")
            spec = runtime.moas[name]
            progress = None
            if not args.json:
                out.write(
                    f"== {name}: {config.moas[name].description or repr(spec.layers[0].policy)}\n"
                )
                progress = Progress(out, live=out.isatty())
            report = await stream_run(spec, messages, progress)
            rows.append(summary_row(name, spec, report, prompt))
    if args.json:
        out.write(
            orjson.dumps(
                {"prompt": prompt, "strategies": rows}, option=orjson.OPT_INDENT_2
            ).decode()
        )
        out.write("\n")
    else:
        out.write(render_table(rows) + "\n")
        line = comparison(rows)
        if line:
            out.write(line + "\n")
    return 0


async def _chat(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    moa_id = args.model or next(iter(config.moas))
    if moa_id not in config.moas:
        raise MoAStreamError(f"unknown MoA {moa_id!r}; known: {', '.join(config.moas)}")
    async with Runtime(config) as runtime:
        spec = runtime.moas[moa_id]
        history: list[ChatMessage] = []
        prompts = [args.prompt] if args.prompt else None
        while True:
            if prompts is not None:
                if not prompts:
                    break
                text = prompts.pop()
            else:
                try:
                    # Reading the terminal blocks, but nothing else runs meanwhile: the run
                    # starts only once the line is in.
                    text = await asyncio.to_thread(input, "you> ")
                except EOFError:
                    break
                if not text.strip():
                    continue
            history.append({"role": "user", "content": text})
            report = await stream_run(spec, history, Progress(sys.stderr, live=sys.stderr.isatty()))
            sys.stdout.write(report.text + "\n")
            sys.stderr.write(render_table([summary_row(moa_id, spec, report)]) + "\n")
            history.append({"role": "assistant", "content": report.text})
    return 0


def _run(coro_fn: Any, args: argparse.Namespace) -> int:
    try:
        return int(_aio.run(coro_fn(args)))
    except MoAStreamError as exc:
        sys.stderr.write(f"moa-stream: error: {exc}\n")
        return 1


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = sub.add_parser(
        "demo",
        help="run the default MoA on simulated models, waiting for all vs. starting early",
        description=__doc__,
    )
    demo.add_argument("prompt", nargs="?", help="the user's message (a default is built in)")
    demo.add_argument("--json", action="store_true", help="print one JSON report on stdout")
    demo.add_argument("--config", help="a TOML config instead of the embedded default")
    demo.add_argument(
        "--strategy",
        action="append",
        metavar="MOA_ID",
        help=f"MoA id to run (repeatable; default: {', '.join(DEMO_STRATEGIES)})",
    )
    demo.set_defaults(func=lambda args: _run(_demo, args))

    chat = sub.add_parser("chat", help="chat with a MoA from a config file")
    chat.add_argument("prompt", nargs="?", help="one message; without it, read lines from stdin")
    chat.add_argument("--config", required=True, help="TOML config with providers, agents, MoAs")
    chat.add_argument("--model", help="MoA id from the config (default: the first)")
    chat.set_defaults(func=lambda args: _run(_chat, args))
