"""``moa-stream bench``: the TTFT-against-quality matrix, written as results.json, summary.md
and plots.

Offline (the default), every strategy runs on every scenario against the simulated upstream and
quality is the simulator's quiz. With ``--config``, the strategies run against the config's
real endpoints on a shipped set of arithmetic questions, scored exactly (or open-ended prompts
rated by ``--judge``).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

import structlog

from moa_stream import _aio
from moa_stream._exceptions import MoAStreamError
from moa_stream.bench.report import headline_sentence
from moa_stream.bench.runner import BenchSettings, run_bench
from moa_stream.bench.scenarios import QUICK, SCENARIOS
from moa_stream.bench.strategies import STRATEGIES

__all__ = ["add_parser", "main", "quiet_logs"]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be greater than 0")
    return value


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the ``bench`` sub-command."""
    scenario_names = ", ".join([*SCENARIOS, QUICK.name])
    parser = sub.add_parser(
        "bench",
        help="benchmark MoA strategies: TTFT against quality and cost",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", required=True, type=Path, help="directory for the results")
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="TOML config with real endpoints (default: simulated, offline)",
    )
    parser.add_argument(
        "--scenario",
        action="extend",
        nargs="+",
        default=[],
        metavar="NAME",
        help=f"scenarios to run (offline; default: all but quick). Known: {scenario_names}",
    )
    parser.add_argument(
        "--strategy",
        action="extend",
        nargs="+",
        default=[],
        metavar="NAME",
        help=f"strategies to run (default: each scenario's set). Known: {', '.join(STRATEGIES)}; "
        "or policy:TEXT for any policy, e.g. 'policy:quorum(2) | deadline(1.0)'",
    )
    parser.add_argument(
        "--requests", type=_positive_int, help="runs per strategy (default: per scenario)"
    )
    parser.add_argument(
        "--concurrency", type=_positive_int, help="runs in flight at once (default: per scenario)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a seconds-long smoke run: the quick scenario (fixed fast models), few runs",
    )
    parser.add_argument("--seed", type=int, default=0, help="simulator seed (default: 0)")
    parser.add_argument(
        "--time-scale",
        type=_positive_float,
        default=1.0,
        help="multiply every simulated delay (and policy time) by this (default: 1)",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run the simulator in this process instead of a child process",
    )
    parser.add_argument(
        "--asyncio", action="store_true", help="use asyncio's event loop instead of uvloop"
    )
    parser.add_argument(
        "--no-plots", action="store_true", help="write no PNG files (no matplotlib needed)"
    )
    real = parser.add_argument_group("real endpoints (with --config)")
    real.add_argument("--moa", metavar="ID", help="the config's MoA whose agents to use")
    real.add_argument("--best", metavar="AGENT", help="the single best agent (default: aggregator)")
    real.add_argument("--judge", metavar="AGENT", help="rate each answer with this agent (1-10)")
    real.add_argument(
        "--questions", type=Path, help="JSON questions with exact answers (default: shipped set)"
    )
    real.add_argument("--prompts", type=Path, help="open-ended prompts, one per line (judged)")
    parser.set_defaults(func=main)


def quiet_logs() -> None:
    """Drop the library's log lines below errors: a benchmark reports failures in its results,
    and printing retries and failures as they happen would garble the progress display and
    spend the measured client's time on writing them."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))


def plots_available() -> bool:
    """Whether matplotlib imports: checked before the matrix runs, not after."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def main(args: argparse.Namespace) -> int:
    """Run the benchmark ``args`` describe; the exit code."""
    if not args.no_plots and not plots_available():
        sys.stderr.write(
            "moa-stream bench: error: the plots need matplotlib, which is not installed: "
            "pip install 'moa_stream[bench]' (make bench does), or pass --no-plots\n"
        )
        return 2
    if not (getattr(args, "log_level", None) or getattr(args, "verbose", 0)):
        quiet_logs()
    settings = BenchSettings(
        out=args.out,
        scenarios=tuple(args.scenario),
        strategies=tuple(args.strategy),
        requests=args.requests,
        concurrency=args.concurrency,
        seed=args.seed,
        time_scale=args.time_scale,
        quick=args.quick,
        sim_process=not args.in_process,
        plots=not args.no_plots,
        config=args.config,
        moa=args.moa,
        best=args.best,
        judge=args.judge,
        questions=args.questions,
        prompts=args.prompts,
        command=shlex.join(["moa-stream", *sys.argv[1:]]) if sys.argv[1:2] == ["bench"] else "",
    )
    try:
        output = _aio.run(run_bench(settings, sys.stderr), use_uvloop=not args.asyncio)
    except (KeyError, ValueError, MoAStreamError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        sys.stderr.write(f"moa-stream bench: error: {message}\n")
        return 2
    for path in output.files:
        sys.stdout.write(f"{path}\n")
    if output.headline is not None:
        sys.stdout.write(headline_sentence(output.headline) + "\n")
    return 0
