"""Running the matrix: every strategy on every scenario, N runs each, C at a time.

Offline, each cell (one strategy on one scenario) gets a fresh simulated upstream with the same
seed, so every strategy meets exactly the same proposer timings and quiz answers: differences
between strategies are the strategies', not luck. The simulator runs in a child process by
default (see :mod:`moa_stream.bench._simhost`). Each run asks a distinct quiz question (the
oracle relies on it), runs are started in question order, and the work that is not being
measured (oracle, judging) is done after a cell's runs have all finished.

Against real endpoints (a config file), the lineup comes from one of the config's MoAs and the
questions from the shipped arithmetic set (or a file); there is no oracle.
"""

from __future__ import annotations

import asyncio
import datetime
import importlib.metadata
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import IO, Any

import aiohttp

from moa_stream import __version__
from moa_stream._exceptions import ConfigError, MoAStreamError
from moa_stream._types import Usage
from moa_stream.bench import report as rep
from moa_stream.bench._progress import Progress
from moa_stream.bench._recording import CallLog, RecordingProvider, current_log
from moa_stream.bench._simhost import InProcessSimHost, ProcessSimHost, SimHost
from moa_stream.bench.baseline import ChatAPI, ReferenceMoA, run_reference
from moa_stream.bench.oracle import RecordSchedule, oracle_parts
from moa_stream.bench.quality import (
    BenchQuestion,
    arithmetic_questions,
    is_correct,
    judge_score,
    load_prompts,
    load_questions,
    quiz_questions,
    unscored_warning,
)
from moa_stream.bench.scenarios import Scenario, get_scenarios
from moa_stream.bench.strategies import Lineup, Runnable, Strategy, get_strategies
from moa_stream.bench.trace import RunTrace, trace_from_report
from moa_stream.engine.spec import Agent, MoA
from moa_stream.providers import OpenAIProvider, Provider, RetryPolicy, Timeouts
from moa_stream.sim import SimModel

__all__ = ["BenchOutput", "BenchSettings", "run_bench", "run_cell"]


@dataclass(frozen=True, slots=True)
class BenchSettings:
    """What ``moa-stream bench`` was asked to do. Empty ``scenarios``/``strategies``: the
    defaults; ``requests``/``concurrency`` ``None``: each scenario's own."""

    out: Path
    scenarios: tuple[str, ...] = ()
    strategies: tuple[str, ...] = ()
    requests: int | None = None
    concurrency: int | None = None
    seed: int = 0
    time_scale: float = 1.0
    quick: bool = False
    sim_process: bool = True
    plots: bool = True
    config: Path | None = None
    moa: str | None = None
    best: str | None = None
    judge: str | None = None
    questions: Path | None = None
    prompts: Path | None = None
    headline_scenario: str = "heterogeneous"
    quality_tolerance: float = 0.03
    command: str = ""


@dataclass(slots=True)
class BenchOutput:
    results: list[dict[str, Any]]
    metadata: dict[str, Any]
    headline: dict[str, Any] | None
    cells: list[rep.CellResult]
    files: list[Path] = field(default_factory=list)


# -- one run -------------------------------------------------------------------------------------


def _messages(question: BenchQuestion) -> list[Any]:
    return [{"role": "user", "content": question.prompt}]


async def _run_engine(spec: MoA, index: int, question: BenchQuestion) -> rep.RunSample:
    log = CallLog()
    current_log.set(log)  # this task's context only; the run's own tasks inherit it
    started: list[float] = []

    def clock() -> float:
        # The engine reads its clock first when the run starts: keep that reading, the run's
        # start on the clock the simulator's records use.
        now = time.monotonic()
        if not started:
            started.append(now)
        return now

    run = spec.stream(_messages(question), clock=clock)
    error: str | None = None
    # When each piece of the answer reached the caller: one list append per piece, on the
    # engine's own event times (seconds since the run started), so recording costs nothing
    # measurable. The answer is analysed after the cell, off the measured path.
    chunk_times: list[float] = []
    try:
        async with run:
            async for event in run.events():
                if event.type == "aggregator.delta" and event.text:
                    chunk_times.append(event.t)
    except MoAStreamError as exc:
        error = f"{type(exc).__name__}: {exc}"
    report = run.report
    return _sample(
        index,
        question,
        trace_from_report(report, log.calls, started[0] if started else None),
        report.usage,
        report.text,
        error=error or report.error,
        correct=_graded(report.text, question, error),
        decided_s=report.time_to_quorum_s,
        chunk_times=tuple(chunk_times),
        aggregator_requests=sum(1 for a in report.agents if a.role == "aggregator"),
    )


def _sample(
    index: int,
    question: BenchQuestion,
    trace: RunTrace,
    usage: Usage,
    text: str,
    *,
    error: str | None,
    correct: bool | None,
    decided_s: float | None,
    chunk_times: tuple[float, ...],
    aggregator_requests: int = 1,
) -> rep.RunSample:
    """One run's sample: its times and references from its trace, which the engine's runs and
    the reference MoA's both have, its tokens from ``usage``."""
    refs = [r for layer in trace.layers for r in layer.references]
    return rep.RunSample(
        index=index,
        question_id=question.id,
        ttft_s=trace.ttft_s,
        total_s=trace.total_s,
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        refs_complete=sum(1 for r in refs if r.status == "complete"),
        refs_partial=sum(1 for r in refs if r.status == "partial"),
        refs_failed=sum(1 for r in refs if r.status == "failed"),
        correct=correct,
        cached_tokens=usage.cached_prompt_tokens,
        tokens_estimated=usage.estimated,
        aggregator_requests=aggregator_requests,
        decided_s=decided_s,
        error=error,
        text=text,
        trace=trace,
        chunk_times=chunk_times,
        reference_ends=_last_layer_ends(trace),
    )


def _last_layer_ends(trace: RunTrace) -> tuple[float | None, ...]:
    """When each proposer of the run's last layer ended, in seconds since the run started
    (``None``: it had not ended when the run was reported)."""
    proposers = [c for c in trace.calls if c.role == "proposer"]
    if not proposers:
        return ()
    last = max(c.layer for c in proposers)
    return tuple(
        None if c.duration_s is None else c.started_s + c.duration_s
        for c in proposers
        if c.layer == last
    )


def _graded(text: str, question: BenchQuestion, error: str | None) -> bool | None:
    # A run that failed answered nothing: wrong, where there is a right answer.
    if error is not None:
        return False if question.answer is not None else None
    return is_correct(text, question)


async def _run_reference(
    spec: ReferenceMoA,
    index: int,
    question: BenchQuestion,
    session: aiohttp.ClientSession,
    endpoints: Mapping[str, ChatAPI],
) -> rep.RunSample:
    current_log.set(CallLog())
    result = await run_reference(spec, _messages(question), session=session, endpoints=endpoints)
    trace = result.trace
    return _sample(
        index,
        question,
        trace,
        result.usage,
        result.text,
        error=result.error,
        correct=_graded(result.text, question, result.error),
        decided_s=trace.layers[0].decided_s if trace.layers else None,
        chunk_times=result.chunk_times,
    )


# -- one cell ------------------------------------------------------------------------------------


async def run_cell(
    runnable: Runnable,
    lineup: Lineup,
    questions: Sequence[BenchQuestion],
    concurrency: int,
    *,
    ramp_s: float = 0.0,
    on_run: Callable[[rep.RunSample], None] | None = None,
) -> tuple[list[rep.RunSample], float, float]:
    """Run every question through ``runnable``, ``concurrency`` at a time, started in order.
    Returns the samples (in question order), the wall time and the client's CPU time.

    ``ramp_s`` spreads the first ``concurrency`` starts evenly over that many seconds. Without
    it they all start at once and, when runs take about equally long, stay in lock-step: every
    request then reaches the upstream in bursts, a load no real service sees.
    """
    samples: list[rep.RunSample | None] = [None] * len(questions)
    gate = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=0)  # the reference MoA's proposers: no pool cap
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(i: int, question: BenchQuestion) -> None:
            async with gate:
                if ramp_s > 0 and i < concurrency:
                    # Holding the slot, so that no later run overtakes into it meanwhile.
                    await asyncio.sleep(ramp_s * i / concurrency)
                if isinstance(runnable, ReferenceMoA):
                    sample = await _run_reference(runnable, i, question, session, lineup.endpoints)
                else:
                    sample = await _run_engine(runnable, i, question)
            samples[i] = sample
            if on_run is not None:
                on_run(sample)

        wall0, cpu0 = time.monotonic(), time.process_time()
        async with asyncio.TaskGroup() as group:
            for i, question in enumerate(questions):
                group.create_task(one(i, question))
        wall, cpu = time.monotonic() - wall0, time.process_time() - cpu0
    done = [s for s in samples if s is not None]
    return done, wall, cpu


def _policy_label(runnable: Runnable) -> str:
    if isinstance(runnable, ReferenceMoA):
        return "wait_all (not streamed)"
    if not runnable.layers:
        return "-"
    return repr(runnable.layers[0].policy)


# -- lineups -------------------------------------------------------------------------------------


def _sim_agent(model: SimModel, provider: Provider) -> Agent:
    # The paper's sampling temperature; the simulator ignores it, real models would not.
    return Agent(model.name, provider, model.name, temperature=0.7)


async def _offline_cell(
    host: SimHost,
    scenario: Scenario,
    strategy: Strategy,
    settings: BenchSettings,
    progress: Progress,
) -> rep.CellResult | None:
    scen = scenario.scaled(settings.time_scale)
    n = settings.requests or scenario.requests
    concurrency = settings.concurrency or scenario.concurrency
    url = await host.start(scen.models, settings.seed)
    # Enough pooled connections for every request of every run in flight (self-MoA sends four
    # to one model), so no request waits for a connection.
    limit = concurrency * max(4, len(scen.proposers)) + 8
    providers: dict[str, Provider] = {
        m.name: RecordingProvider(
            OpenAIProvider(
                url,
                name=m.name,
                limit=limit,
                timeouts=Timeouts(connect=10, first_token=120, idle=120, total=600),
                retry=RetryPolicy(max_attempts=3),
            )
        )
        for m in scen.models
    }
    try:
        agents = {name: _sim_agent(m, providers[name]) for name, m in _by_name(scen).items()}
        lineup = Lineup(
            proposers=tuple(agents[m.name] for m in scen.proposers),
            aggregator=agents[scen.aggregator.name],
            best=agents[scen.best.name],
            layers=scen.layers,
            endpoints=MappingProxyType({name: ChatAPI(url) for name in agents}),
            time_scale=settings.time_scale * scenario.policy_scale,
        )
        runnable = strategy.make(lineup)
        if runnable is None:
            return None
        questions = quiz_questions(n)
        progress.cell_started(scenario.name, strategy.name, n)
        samples, wall, cpu = await run_cell(
            runnable,
            lineup,
            questions,
            concurrency,
            ramp_s=0.0 if concurrency == 1 else scenario.ramp_s * settings.time_scale,
            on_run=lambda s: progress.run_done(s.error is not None),
        )
        records = {r["request_id"]: r for r in await host.records()}
    finally:
        for provider in providers.values():
            await provider.aclose()
        await host.stop()
    for sample in samples:
        _server_prompt_tokens(sample, records)
    schedule = RecordSchedule(records)
    for sample in samples:
        trace = sample.trace
        parts = None if trace is None else oracle_parts(trace, schedule)
        if trace is None or parts is None or trace.ttft_s is None:
            continue
        sample.oracle_ttft_s = parts.ttft
        if trace.layers:
            # Where the time over the oracle went: reaching the last decision, or from there
            # to the first answer token.
            decided = trace.layers[-1].decided_s
            sample.decision_over_s = decided - sum(parts.layers)
            sample.aggregator_over_s = trace.ttft_s - decided - parts.aggregator
    return _cell(strategy, runnable, scenario.name, concurrency, scen.layers, samples, wall, cpu)


def _server_prompt_tokens(sample: rep.RunSample, records: Mapping[str, Any]) -> None:
    """An engine run's prompt tokens as the simulator counted them, cached ones included. A
    stream closed early (a staircase step) never receives its usage chunk, so only the
    server's own record says how much of its prompt came from the cache."""
    trace = sample.trace
    if trace is None or not trace.calls or not all(c.streamed for c in trace.calls):
        return
    found = [records.get(c.request_id) if c.request_id else None for c in trace.calls]
    if any(r is None for r in found):
        return
    sample.prompt_tokens = sum(int(r["prompt_tokens"]) for r in found if r is not None)
    sample.cached_tokens = sum(int(r["cached_tokens"]) for r in found if r is not None)


def _by_name(scenario: Scenario) -> dict[str, SimModel]:
    return {m.name: m for m in scenario.models}


def _cell(
    strategy: Strategy,
    runnable: Runnable,
    scenario: str,
    concurrency: int,
    layers: int,
    samples: list[rep.RunSample],
    wall: float,
    cpu: float,
) -> rep.CellResult:
    # Keep one run's trace (the first question's: the same one for every strategy) for the
    # timeline plot; the others are no longer needed.
    timeline = samples[0].trace if samples else None
    for sample in samples:
        sample.trace = None
    return rep.CellResult(
        strategy=strategy.name,
        description=strategy.description,
        policy=_policy_label(runnable),
        scenario=scenario,
        concurrency=concurrency,
        layers=layers,
        samples=samples,
        wall_s=wall,
        client_cpu_s=cpu,
        timeline=timeline,
    )


def _plan_offline(settings: BenchSettings) -> list[tuple[Scenario, Strategy]]:
    scenarios = get_scenarios(settings.scenarios, quick=settings.quick)
    chosen = get_strategies(settings.strategies)
    cells = []
    for scenario in scenarios:
        for strategy in chosen:
            default_set = scenario.strategies
            if settings.strategies or default_set is None or strategy.name in default_set:
                cells.append((scenario, strategy))
    return cells


async def _run_offline(settings: BenchSettings, progress_out: IO[str] | None) -> BenchOutput:
    plan = _plan_offline(settings)
    progress = Progress(progress_out, len(plan))
    host: SimHost = ProcessSimHost() if settings.sim_process else InProcessSimHost()
    cells: list[rep.CellResult] = []
    scenarios: dict[str, str] = {}
    try:
        async with host:
            for scenario, strategy in plan:
                scenarios[scenario.name] = scenario.description
                cell = await _offline_cell(host, scenario, strategy, settings, progress)
                if cell is None:
                    progress.cell_skipped(
                        f"{strategy.name} on {scenario.name}", strategy.needs or "not applicable"
                    )
                    continue
                cells.append(cell)
                progress.cell_done(rep.summarize(cell))
    finally:
        progress.close()
    sim = "in a separate process" if settings.sim_process else "in the benchmark's process"
    meta = _metadata(settings, "offline (simulated upstream)", f"simulator {sim}")
    meta["requests_per_scenario"] = {s.name: settings.requests or s.requests for s, _ in plan}
    return _finish(settings, cells, meta, scenarios)


# -- real endpoints ------------------------------------------------------------------------------


def _endpoints(runtime: Any) -> dict[str, ChatAPI]:
    """Each agent's endpoint, from its provider's config (the key resolved as the provider
    resolves it), for the reference MoA's plain HTTP requests."""
    config = runtime.config
    out = {}
    for name, agent_config in config.agents.items():
        p = config.providers[agent_config.provider]
        base_url = runtime.sim.base_url if p.kind == "sim" else p.base_url
        headers = dict(p.headers)
        key = p.api_key or (os.environ.get(p.api_key_env) if p.api_key_env else None)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        out[name] = ChatAPI(base_url, tuple(headers.items()), p.max_tokens_field)
    return out


def _real_questions(settings: BenchSettings) -> list[BenchQuestion]:
    if settings.prompts is not None:
        questions = load_prompts(settings.prompts)
    elif settings.questions is not None:
        questions = load_questions(settings.questions)
    else:
        questions = arithmetic_questions()
    n = settings.requests or len(questions)
    out = []
    for i in range(n):
        q = questions[i % len(questions)]
        out.append(q if i < len(questions) else replace(q, id=f"{q.id}#{i // len(questions)}"))
    return out


async def _run_real(settings: BenchSettings, progress_out: IO[str] | None) -> BenchOutput:
    from moa_stream.config import Runtime, load_config

    assert settings.config is not None
    config = load_config(settings.config)
    moa_id = settings.moa or next(
        (k for k, m in config.moas.items() if m.preset == "moa" and m.proposers), None
    )
    if moa_id is None or moa_id not in config.moas:
        raise ConfigError(
            f"no MoA {settings.moa!r} with proposers in the config"
            if settings.moa
            else "the config has no [moa.<id>] with preset 'moa' and proposers",
            source=str(settings.config),
        )
    m = config.moas[moa_id]
    for name in (settings.best, settings.judge):
        if name is not None and name not in config.agents:
            raise ConfigError(f"unknown agent {name!r}", source=str(settings.config))
    questions = _real_questions(settings)
    concurrency = settings.concurrency or 1
    strategies = get_strategies(settings.strategies)
    progress = Progress(progress_out, len(strategies))
    warnings: list[str] = []
    scenario = f"config:{moa_id}"
    cells: list[rep.CellResult] = []
    try:
        async with Runtime(config) as runtime:
            agents = runtime.agents
            lineup = Lineup(
                proposers=tuple(agents[a] for a in m.proposers),
                aggregator=agents[m.aggregator],
                best=agents[settings.best or m.aggregator],
                layers=m.layers,
                endpoints=MappingProxyType(_endpoints(runtime)),
            )
            judge = agents[settings.judge] if settings.judge else None
            for strategy in strategies:
                runnable = strategy.make(lineup)
                if runnable is None:
                    progress.cell_skipped(strategy.name, strategy.needs or "not applicable")
                    continue
                progress.cell_started(scenario, strategy.name, len(questions))
                samples, wall, cpu = await run_cell(
                    runnable,
                    lineup,
                    questions,
                    concurrency,
                    on_run=lambda s: progress.run_done(s.error is not None),
                )
                if judge is not None:
                    await _judge(judge, questions, samples)
                    answered = [s for s in samples if s.error is None]
                    scored = sum(1 for s in answered if s.judge_score is not None)
                    loud = unscored_warning(len(answered), scored, judge.name)
                    if loud is not None:
                        progress.message(f"{strategy.name}: {loud}")
                        warnings.append(f"{strategy.name}: {loud}")
                cell = _cell(
                    strategy, runnable, scenario, concurrency, m.layers, samples, wall, cpu
                )
                cells.append(cell)
                progress.cell_done(rep.summarize(cell))
    finally:
        progress.close()
    described = m.description or f"the config's MoA {moa_id!r}"
    meta = _metadata(settings, f"real endpoints ({settings.config})", None)
    if warnings:
        meta["warnings"] = warnings
    return _finish(settings, cells, meta, {scenario: described})


async def _judge(
    judge: Agent,
    questions: Sequence[BenchQuestion],
    samples: Sequence[rep.RunSample],
) -> None:
    # Judged after the cell, a few at a time: the judge's load must not slow the measured runs.
    gate = asyncio.Semaphore(4)

    async def one(sample: rep.RunSample) -> None:
        async with gate:
            prompt = questions[sample.index].prompt
            sample.judge_score = await judge_score(judge, prompt, sample.text)

    async with asyncio.TaskGroup() as group:
        for sample in samples:
            group.create_task(one(sample))


# -- results -------------------------------------------------------------------------------------


def _loop_name() -> str:
    loop = asyncio.get_running_loop()
    module = type(loop).__module__
    if module.startswith("uvloop"):
        return f"uvloop {importlib.metadata.version('uvloop')}"
    return "asyncio"


def _metadata(settings: BenchSettings, mode: str, sim: str | None) -> dict[str, Any]:
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "mode": mode,
        "machine": {
            "cores": os.cpu_count(),
            "platform": platform.platform(terse=True),
            "processor": platform.machine(),
        },
        "python": platform.python_version(),
        "implementation": sys.implementation.name,
        "loop": _loop_name(),
        "moa_stream": __version__,
        "seed": settings.seed,
        "requests": settings.requests,
        "concurrency": settings.concurrency,
        "time_scale": settings.time_scale,
        "simulator": sim,
        "command": settings.command,
    }


def _finish(
    settings: BenchSettings,
    cells: list[rep.CellResult],
    metadata: dict[str, Any],
    scenarios: dict[str, str],
) -> BenchOutput:
    rep.attach_one_shot(cells)
    results = [rep.summarize(c) for c in cells]
    rep.with_bill_ratios(results)
    head = rep.headline(results, settings.headline_scenario, tolerance=settings.quality_tolerance)
    if head is None and results:
        # The headline scenario was not run: report the first one that has a reference MoA.
        for name in scenarios:
            head = rep.headline(results, name, tolerance=settings.quality_tolerance)
            if head is not None:
                break
    if head is not None:
        rep.with_reduction_intervals(head, cells)
    out = BenchOutput(results, metadata, head, cells)
    settings.out.mkdir(parents=True, exist_ok=True)
    timelines: dict[str, RunTrace] = {
        f"{c.scenario}/{c.strategy}": c.timeline for c in cells if c.timeline is not None
    }
    results_path = settings.out / "results.json"
    rep.write_results(results_path, results, metadata, head, timelines)
    plots: list[Path] = []
    if settings.plots and cells:
        from moa_stream.bench import plots as plotting

        plots = plotting.write_plots(settings.out, cells, results, head)
    summary_path = settings.out / "summary.md"
    summary_path.write_text(
        rep.render_summary(results, metadata, scenarios, head, [p.name for p in plots]),
        encoding="utf-8",
    )
    out.files = [results_path, summary_path, *plots]
    return out


async def run_bench(settings: BenchSettings, progress: IO[str] | None = None) -> BenchOutput:
    """Run the benchmark ``settings`` describe and write its files into ``settings.out``.

    ``progress`` receives the progress display (``None``: silent).
    """
    if settings.config is not None:
        return await _run_real(settings, progress)
    return await _run_offline(settings, progress)
