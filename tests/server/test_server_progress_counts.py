"""Counts in progress items are tokens estimated from characters, labelled as estimates."""

from __future__ import annotations

from typing import Any

import orjson

from moa_stream import estimate_tokens
from moa_stream._types import Usage
from moa_stream.engine.events import (
    LayerDone,
    ProposerDelta,
    ProposerDone,
    ProposerStarted,
    ReferenceInfo,
)
from moa_stream.server.progress import PREFIX, TOKENS_INTERVAL, ProgressEncoder


def _items(frame: bytes | None) -> list[dict[str, Any]]:
    if frame is None:
        return []
    return [orjson.loads(line[len(PREFIX) :]) for line in frame.split(b"\n\n") if line]


def test_proposer_tokens_are_estimated_from_characters_not_counted_per_delta() -> None:
    enc = ProgressEncoder()
    enc.frame(ProposerStarted(0, 0, "a", 0.0))
    enc.frame(ProposerStarted(0, 1, "b", 0.0))
    # Two deltas of very different sizes, then one after the interval to get an item out.
    enc.frame(ProposerDelta(0, 0, "a", "x" * 400, 0.01))
    enc.frame(ProposerDelta(0, 1, "b", "y", 0.02))
    items = _items(enc.frame(ProposerDelta(0, 0, "a", "z" * 3, TOKENS_INTERVAL + 0.1)))
    tokens = [i for i in items if i["type"] == "proposer.tokens"]
    assert tokens, items
    assert tokens[-1]["tokens"] == {"a": estimate_tokens(403), "b": estimate_tokens(1)}
    assert tokens[-1]["estimated"] is True


def test_layer_done_gives_a_streaming_reference_the_same_estimate() -> None:
    enc = ProgressEncoder()
    enc.frame(ProposerStarted(0, 0, "a", 0.0))
    enc.frame(ProposerStarted(0, 1, "b", 0.0))
    for i in range(5):
        enc.frame(ProposerDelta(0, 1, "b", "word " * 9, 0.001 * i))
    enc.frame(ProposerDone(0, 0, "a", "done", "stop", Usage(3, 11, estimated=True), 0.1, 0.2))
    refs = (ReferenceInfo("a", 0, "complete", 4, 11), ReferenceInfo("b", 1, "partial", 225, 0))
    (layer,) = _items(enc.frame(LayerDone(0, "partial", refs, None, None, 0.3)))
    by_agent = {r["agent"]: r["tokens"] for r in layer["references"]}
    assert by_agent == {"a": 11, "b": estimate_tokens(5 * len("word " * 9))}


def test_done_items_say_whether_their_usage_is_estimated() -> None:
    enc = ProgressEncoder()
    (item,) = _items(
        enc.frame(ProposerDone(0, 0, "a", "hi", "stop", Usage(3, 1, estimated=True), 0.1, 0.2))
    )
    assert item["tokens"] == 1 and item["estimated"] is True
