"""Whether the aggregator prompt's wording changes what a small real aggregator writes.

Three proposers and an aggregator, all SmolLM2-135M-Instruct on one llama-server
(``--base-url``, a running OpenAI-compatible server with the model ``smollm2``), answer the
real-inference benchmark's open questions with the ``wait_all`` policy (every reference
complete, so only the wording differs), once with each wording:

- ``notes``: the engine's default templates (references are notes on the question; the
  instructions ask for the answer alone);
- ``drafts``: the wording the engine used before (references are drafts of answers to "the
  message"; the instructions list what not to do with them).

Proposers and aggregator sample at temperature 0.7 with fixed seeds, so both wordings get the
same proposer answers and a rerun repeats the runs (same server build and threads). For each
wording: answers that write about their prompt, copy its markup or text, restarts and loops per
answer, words and fresh words (``moa_stream.bench.integrity``).

    .venv/bin/python benchmarks/prompt_wording.py --base-url http://127.0.0.1:8090/v1
        [--questions 20] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import sys
from pathlib import Path
from typing import Any

import orjson
from real_inference import QUESTIONS

from moa_stream import Agent, OpenAIProvider, RetryPolicy, Timeouts, WaitAll, moa
from moa_stream.bench._cli import quiet_logs
from moa_stream.bench.integrity import Integrity, answer_integrity
from moa_stream.engine.prompts import PromptTemplates

#: The wording before the notes: what the engine's templates said.
DRAFTS = PromptTemplates(
    instructions=(
        "Write your own answer to the user's message above. The drafts are material to weigh, "
        "not part of the conversation: some may be wrong, biased or incomplete. Keep what is "
        "correct and well argued in them, correct or drop what is not, and fill any gaps. "
        "Answer the user directly: do not copy a draft as it is, do not mention the drafts, "
        "their numbers or their tags, and do not imitate their quoting. A draft marked partial "
        "is unfinished: it may stop mid-sentence and may not have reached its conclusion. A "
        "draft marked failed produced nothing."
    ),
    status_note="",
    header=(
        "Other assistants drafted answers to the message above. Their drafts are quoted "
        'below, each between <draft n="..."> and </draft>.'
    ),
    update_header="The drafts went on. What they added since, quoted the same way:",
)
WORDINGS = {"notes": PromptTemplates(), "drafts": DRAFTS}
PROPOSER_TOKENS = 160
AGGREGATOR_TOKENS = 320


async def answers(base_url: str, questions: list[str]) -> dict[str, list[dict[str, Any]]]:
    provider = OpenAIProvider(
        base_url,
        api_key="unused",
        timeouts=Timeouts(connect=10, first_token=120, idle=120, total=600),
        retry=RetryPolicy(max_attempts=2),  # llama-server closes a connection after a stream
    )

    def agent(name: str, seed: int, max_tokens: int) -> Agent:
        return Agent(
            name, provider, "smollm2", temperature=0.7, max_tokens=max_tokens, extra={"seed": seed}
        )

    proposers = [agent(f"p{i}", i, PROPOSER_TOKENS) for i in range(3)]
    base = moa(proposers, agent("agg", 99, AGGREGATOR_TOKENS), policy=WaitAll())
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in WORDINGS}
    try:
        for question in questions:
            for name, templates in WORDINGS.items():
                spec = dataclasses.replace(base, templates=templates)
                async with spec.stream([{"role": "user", "content": question}]) as run:
                    text = "".join([piece async for piece in run.text()])
                out[name].append({"question": question, "answer": text})
                print(".", end="", file=sys.stderr, flush=True)
    finally:
        await provider.aclose()
    print(file=sys.stderr)
    return out


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    checks: list[Integrity] = [answer_integrity(r["answer"], question=r["question"]) for r in runs]
    return {
        "answers": len(checks),
        "about_prompt_answers": sum(1 for i in checks if i.about_prompt),
        "markup_answers": sum(1 for i in checks if i.markup),
        "restarts_per_answer": statistics.mean(i.restarts for i in checks),
        "loops_per_answer": statistics.mean(i.loops for i in checks),
        "words_p50": statistics.median(i.words for i in checks),
        "fresh_words_p50": statistics.median(i.fresh_words for i in checks),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--base-url", required=True, metavar="URL")
    parser.add_argument("--questions", type=int, default=20, metavar="N")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write every answer here")
    args = parser.parse_args(argv)
    quiet_logs()
    runs = asyncio.run(answers(args.base_url, list(QUESTIONS[: args.questions])))
    rows = {name: summary(r) for name, r in runs.items()}
    print(
        "| wording | answers | about the prompt | with markup | restarts / answer "
        "| loops / answer | words p50 | fresh words p50 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(
            f"| {name} | {r['answers']} | {r['about_prompt_answers']} | {r['markup_answers']} "
            f"| {r['restarts_per_answer']:.2f} | {r['loops_per_answer']:.2f} "
            f"| {r['words_p50']:.0f} | {r['fresh_words_p50']:.0f} |"
        )
    if args.json:
        args.json.write_bytes(
            orjson.dumps({"summary": rows, "runs": runs}, option=orjson.OPT_INDENT_2)
        )


if __name__ == "__main__":
    main()
