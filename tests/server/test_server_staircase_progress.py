"""The progress items a page builds a staircase run's figures from, and that they agree.

The playground shows each lane's "tokens so far" beside its text, which proposers the answer
used, and the answer's token count; every figure comes from these items, so they must carry
one consistent set: counts that match the text sent, the references of every step, and an
answer count that is the sum of its steps.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import aiohttp
import orjson
from support.requests import body
from support.server import serving, stairs_config, stream

from moa_stream import estimate_tokens
from moa_stream._types import Usage
from moa_stream.engine.events import (
    LayerDone,
    ProposerDelta,
    ProposerStarted,
    ReferenceInfo,
    RunDone,
    RunReport,
)
from moa_stream.server.progress import PREFIX, ProgressEncoder


def _items(raw: bytes | None) -> list[dict[str, Any]]:
    if raw is None:
        return []
    return [orjson.loads(part[len(PREFIX) :]) for part in raw.split(b"\n\n") if part]


def _check_counts_follow_text(items: list[dict[str, Any]]) -> None:
    """Every ``proposer.text`` item is followed by its layer's counts, and they count all the
    text sent so far."""
    chars: dict[tuple[int, str], int] = defaultdict(int)
    for i, item in enumerate(items):
        if item["type"] != "proposer.text":
            continue
        layer = item["layer"]
        for agent, text in item["text"].items():
            chars[(layer, agent)] += len(text)
        following = items[i + 1] if i + 1 < len(items) else None
        assert following is not None and following["type"] == "proposer.tokens", items[i : i + 2]
        assert following["layer"] == layer
        for agent in item["text"]:
            assert following["tokens"][agent] == estimate_tokens(chars[(layer, agent)])


def test_a_burst_of_text_comes_with_its_counts() -> None:
    """A staircase hands its proposers' deltas on in bursts; the counts must not lag them."""
    enc = ProgressEncoder(text=True)
    items: list[dict[str, Any]] = []
    items += _items(enc.frame(ProposerStarted(0, 0, "a", 0.0)))
    items += _items(enc.frame(ProposerStarted(0, 1, "b", 0.0)))
    items += _items(enc.frame(ProposerDelta(0, 0, "a", "Hello there. ", 0.05)))
    # A burst: many deltas at one moment, well past both intervals.
    for _ in range(30):
        items += _items(enc.frame(ProposerDelta(0, 1, "b", "word ", 0.8)))
        items += _items(enc.frame(ProposerDelta(0, 0, "a", "more ", 0.8)))
    ref = ReferenceInfo("a", 0, "partial", 10, 3)
    items += _items(enc.frame(LayerDone(0, "partial", (ref,), None, None, 0.81)))
    items += _items(enc.frame(ProposerDelta(0, 1, "b", " the last words", 0.82)))
    report = RunReport("", None, None, None, None, 0.9, Usage(), (), ())
    items += _items(enc.frame(RunDone(report, 0.9)))
    _check_counts_follow_text(items)
    last = [i for i in items if i["type"] == "proposer.tokens"][-1]
    assert last["tokens"]["b"] == estimate_tokens(len("word " * 30 + " the last words"))


async def test_a_staircase_streams_one_consistent_set_of_figures() -> None:
    async with serving(stairs_config(restarts=False)) as srv, aiohttp.ClientSession() as session:
        sse = await stream(session, srv.url, body("stairs"), headers={"X-MoA-Progress": "text"})
    assert sse.status == 200
    items = sse.progress()
    _check_counts_follow_text(items)
    steps = [i for i in items if i["type"] == "aggregator.step"]
    assert steps, "a staircase says when it asks each step"
    # Every step names the references it read, with how much of each it read.
    for step in steps:
        assert all({"agent", "index", "status", "chars"} <= set(r) for r in step["references"])
    (done,) = [i for i in items if i["type"] == "aggregator.done"]
    report = [i for i in items if i["type"] == "run.done"][-1]["report"]
    answering = [
        a
        for a in report["agents"]
        if a["role"] == "aggregator" and a["agent"] == report["aggregator"]
    ]
    # The answer's count is every step's: the item and the report say the same.
    assert done["tokens"] == sum(a["usage"]["completion_tokens"] for a in answering)
