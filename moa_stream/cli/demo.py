"""moa-stream demo: a MoA on simulated models, waiting for every proposer against starting early.

It needs nothing: the simulated upstream starts in this process. It asks one quiz question and
runs two MoAs of the embedded config on it: the original MoA (the aggregator waits for every
proposer) and the staircase (the aggregator starts on the proposers' first few tokens and is
asked again, step by step, with what they wrote since). Then it compares their times to the
first token. The simulated models write filler text that ends in an "Answer: N" line, right or
wrong at each model's configured accuracy.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import IO, Any

import orjson

from moa_stream import _aio
from moa_stream._exceptions import MoAStreamError
from moa_stream._probe import check_at_start, hint_for
from moa_stream._types import ChatMessage
from moa_stream.cli._common import add_config_arguments, add_documented_command, exit_on_error
from moa_stream.cli.live import LiveView, fmt_seconds, fmt_tokens
from moa_stream.config import Config, Runtime, default_config, load_config
from moa_stream.engine.events import RunReport
from moa_stream.engine.spec import MoA
from moa_stream.sim.quiz import extract_answer, find_question, get_question

__all__ = ["add_parser", "comparison", "render_table", "stream_run", "summary_row"]

# A quiz question of the simulator's (its models write a final "Answer: N" line, right or wrong
# with their configured accuracy), so the demo can show whether each answer is correct.
DEFAULT_PROMPT = get_question("Q7").prompt
DEMO_MOAS = ("moa-wait-all", "staircase")


async def stream_run(
    spec: MoA, messages: Sequence[ChatMessage], view: LiveView | None
) -> RunReport:
    """Run ``spec`` on ``messages``, showing every event on ``view``; the report.

    A run that fails or is cancelled leaves no live line behind, and the log lines held back
    while its answer streamed are written."""
    try:
        async with spec.stream(messages) as run:
            async for event in run.events():
                if view is not None:
                    view(event)
    except BaseException:
        if view is not None:
            view.clear()
        raise
    return run.report


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
        "usage_estimated": report.usage.estimated,
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
    """One line per run: its times (seconds), tokens and, for a quiz question, the answer."""
    header = (
        "MoA",
        "policy",
        "TTFT",
        "to quorum",
        "agg TTFT",
        "total",
        "tokens in / out",
        "answer",
    )
    lines = [
        (
            r["name"],
            r["policy"],
            fmt_seconds(r["ttft_s"]),
            fmt_seconds(r["time_to_quorum_s"]),
            fmt_seconds(r["aggregator_ttft_s"]),
            fmt_seconds(r["total_s"]),
            f"{fmt_tokens(r['prompt_tokens'], r['usage_estimated'])} / "
            f"{fmt_tokens(r['completion_tokens'], r['usage_estimated'])}",
            _fmt_answer(r),
        )
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*line).rstrip() for line in lines]
    out[0] = out[0].rstrip()
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


def staircase_note(
    rows: Sequence[dict[str, Any]], names: Sequence[str], specs: dict[str, MoA]
) -> str | None:
    """A line under the table when a staircase is in it: its aggregator TTFT and prompt tokens
    look alarming next to a plain MoA's, and both have a reason that the table cannot say."""
    stairs = [n for n in names if specs[n].staircase is not None]
    if not stairs or not rows:
        return None
    return (
        f"{', '.join(stairs)}: the aggregator is asked again at each step, so agg TTFT runs "
        "from its first request and tokens in add up over the steps (mostly prefix-cache hits)."
    )


def _is_simulated(config: Config, spec: MoA) -> bool:
    names = {a.name for a in spec.agents}
    return all(
        config.providers[config.agents[n].provider].kind == "sim"
        for n in names
        if n in config.agents
    )


def _intro(out: IO[str], prompt: str, simulated: bool) -> None:
    out.write("Question:\n")
    out.write("".join(f"  {line}\n" for line in prompt.splitlines()))
    if simulated:
        out.write(
            "\nThe models are simulated: their answers are filler text ending in an "
            "'Answer: N' line,\nright or wrong at each model's configured accuracy. "
            "Times are real, in seconds.\n"
        )
    out.write("\n")


async def _demo(args: argparse.Namespace) -> int:
    config: Config = load_config(args.config) if args.config else default_config()
    prompt = args.prompt or DEFAULT_PROMPT
    messages: list[ChatMessage] = [{"role": "user", "content": prompt}]
    names = args.moa or [n for n in DEMO_MOAS if n in config.moas] or list(config.moas)[:2]
    unknown = [n for n in names if n not in config.moas]
    if unknown:
        raise MoAStreamError(f"unknown MoA {unknown[0]!r}; known: {', '.join(config.moas)}")
    if not await check_at_start(config, "demo", fatal=args.check):
        return 1
    out = sys.stdout
    rows = []
    runtime_specs: dict[str, MoA] = {}
    async with Runtime(config) as runtime:
        if not args.json:
            _intro(out, prompt, all(_is_simulated(config, runtime.moas[n]) for n in names))
        for name in names:
            spec = runtime.moas[name]
            runtime_specs[name] = spec
            view = None
            if not args.json:
                about = config.moas[name].description or repr(spec.layers[0].policy)
                out.write(f"== {name}: {about}\n")
                view = LiveView(spec, progress=out, answer=out, live=out.isatty())
            try:
                report = await stream_run(spec, messages, view)
            except MoAStreamError as exc:
                hint = hint_for(exc, config)
                if hint is None:
                    raise
                raise MoAStreamError(f"{exc}; {hint}") from exc
            if not args.json:
                out.write("\n")
            rows.append(summary_row(name, spec, report, prompt))
    if args.json:
        out.write(
            orjson.dumps(
                {"prompt": prompt, "strategies": rows}, option=orjson.OPT_INDENT_2
            ).decode()
        )
        out.write("\n")
    else:
        out.write(
            "Times in seconds from the request; tokens as the models reported them "
            "(~: estimated from characters, where a model sent no usage).\n"
        )
        out.write(render_table(rows) + "\n")
        note = staircase_note(rows, names, runtime_specs)
        if note:
            out.write(note + "\n")
        line = comparison(rows)
        if line:
            out.write(line + "\n")
    return 0


def run_command(coro_fn: Any, args: argparse.Namespace) -> int:
    """Run a command's coroutine; a library error becomes one line on stderr and exit 1, a
    configuration error exit 2 (as for ``serve`` and ``chat``, so a script can tell them
    apart)."""
    return exit_on_error("demo", lambda: int(_aio.run(coro_fn(args))))


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the ``demo`` sub-command."""
    demo = add_documented_command(
        sub,
        "demo",
        "run a MoA on simulated models: waiting for all proposers vs. starting early",
        __doc__,
    )
    demo.add_argument("prompt", nargs="?", help="the user's message (default: a quiz question)")
    demo.add_argument("--json", action="store_true", help="print one JSON report on stdout")
    demo.add_argument(
        "--moa",
        action="append",
        metavar="ID",
        help=f"a MoA id of the config to run (repeatable; default: {', '.join(DEMO_MOAS)})",
    )
    add_config_arguments(demo)
    # The option's former name, kept working; `bench --strategy` names bench strategies.
    demo.add_argument("--strategy", action="append", dest="moa", help=argparse.SUPPRESS)
    demo.set_defaults(func=lambda args: run_command(_demo, args))
