"""Progress items say where they belong: the request id, their place in the request's stream
(``seq``) and when they were made (``ts``, seconds since the epoch)."""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import orjson
from support.requests import body
from support.server import Running, stream

from moa_stream._types import Usage
from moa_stream.engine.events import (
    LayerDone,
    ProposerDelta,
    ProposerDone,
    ProposerStarted,
    ReferenceInfo,
)
from moa_stream.server.progress import PREFIX, ProgressEncoder


def _items(raw: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(part[len(PREFIX) :]) for part in raw.split(b"\n\n") if part]


async def test_streamed_items_carry_request_id_seq_and_ts(srv: Running) -> None:
    async with aiohttp.ClientSession() as session:
        for level in ("1", "text"):
            before = time.time()
            sse = await stream(session, srv.url, body(), headers={"X-MoA-Progress": level})
            after = time.time()
            assert sse.status == 200
            items = sse.progress()
            assert len(items) >= 4
            request_id = sse.headers["X-Request-Id"]
            assert {item["request_id"] for item in items} == {request_id}
            assert [item["seq"] for item in items] == list(range(len(items)))
            stamps = [item["ts"] for item in items]
            assert stamps == sorted(stamps)
            assert before - 0.001 <= stamps[0] and stamps[-1] <= after + 0.001
            assert items[-1]["type"] == "run.done"


def test_held_text_is_numbered_before_the_item_it_precedes() -> None:
    ticks = iter(range(1000, 2000))
    enc = ProgressEncoder(text=True, request_id="r1", clock=lambda: float(next(ticks)))
    raw = b""
    for event in (
        ProposerStarted(0, 0, "a", 0.0),
        ProposerDelta(0, 0, "a", "Hello ", 0.5),
        ProposerDelta(0, 0, "a", "there.", 0.51),  # held back: within the text interval
        ProposerDone(0, 0, "a", "Hello there.", "stop", Usage(3, 4), 0.1, 0.52),
        LayerDone(0, "all", (ReferenceInfo("a", 0, "complete", 12, 4),), None, None, 0.53),
    ):
        raw += enc.frame(event) or b""
    items = _items(raw)
    types = [item["type"] for item in items]
    done = types.index("proposer.done")
    assert types[done - 2 : done] == ["proposer.text", "proposer.tokens"]
    assert items[done - 2]["text"] == {"a": "there."}
    assert [item["seq"] for item in items] == list(range(len(items)))
    assert [item["ts"] for item in items] == [float(1000 + i) for i in range(len(items))]
    assert {item["request_id"] for item in items} == {"r1"}


def test_without_a_request_id_items_are_as_before() -> None:
    frame = ProgressEncoder().frame(ProposerStarted(0, 0, "a", 0.0))
    assert frame is not None
    assert set(_items(frame)[0]) == {"type", "layer", "index", "agent", "t"}
