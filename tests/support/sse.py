"""The suite's one reader of server-sent events, for the server, the simulator and the
integrations alike (all frame events with LF).

``parse_sse`` reads a complete body; ``read_events`` reads a response as it arrives and stamps
each event with ``time.monotonic()``; ``SSE`` is a response read to its end with views of it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson


@dataclass
class Event:
    """One SSE line of interest: a ``data:`` payload, a ``:`` comment (text after the colon,
    unstripped) or an ``event:`` name, with its arrival time."""

    kind: str
    text: str
    at: float = 0.0

    def json(self) -> Any:
        return orjson.loads(self.text)


def parse_sse(raw: bytes, at: float = 0.0) -> list[Event]:
    """Every data, comment and event line of a complete SSE body, in order. Any other line
    fails the test: nothing else is expected on these wires."""
    events = []
    for block in raw.decode().split("\n\n"):
        for line in block.split("\n"):
            if line.startswith(":"):
                events.append(Event("comment", line[1:], at))
            elif line.startswith("data: "):
                events.append(Event("data", line[len("data: ") :], at))
            elif line.startswith("event: "):
                events.append(Event("event", line[len("event: ") :], at))
            elif line:
                raise AssertionError(f"unexpected SSE line {line!r}")
    return events


async def read_events(resp: aiohttp.ClientResponse) -> list[Event]:
    """Read the whole body incrementally, stamping each event with ``time.monotonic()``."""
    events: list[Event] = []
    buf = b""
    async for piece in resp.content.iter_any():
        now = time.monotonic()
        buf += piece
        complete, sep, rest = buf.rpartition(b"\n\n")
        if sep:
            events.extend(parse_sse(complete + sep, now))
            buf = rest
    if buf:
        events.extend(parse_sse(buf, time.monotonic()))
    return events


def chunks(events: list[Event]) -> list[dict[str, Any]]:
    """The JSON chunks of a stream (data events other than ``[DONE]``)."""
    return [e.json() for e in events if e.kind == "data" and e.text != "[DONE]"]


def content(chunk_list: list[dict[str, Any]]) -> str:
    """The streamed answer text."""
    return "".join(
        c["choices"][0]["delta"].get("content") or "" for c in chunk_list if c.get("choices")
    )


def sse_items(raw: bytes) -> list[tuple[str, str]]:
    """``(kind, text)`` of every event of a complete body."""
    return [(e.kind, e.text) for e in parse_sse(raw)]


def sse_chunks(raw: bytes) -> list[dict[str, Any]]:
    """The JSON data payloads of a complete body, ``[DONE]`` excluded (it must be last)."""
    events = parse_sse(raw)
    data = [e.text for e in events if e.kind == "data"]
    assert data[-1] == "[DONE]", data[-3:]
    return chunks(events)


def sse_text(raw: bytes) -> str:
    """The answer text of a complete body."""
    return content(sse_chunks(raw))


@dataclass
class SSE:
    """A streamed response read to its end: its status, headers and events."""

    status: int
    headers: Any
    events: list[Event]

    @property
    def data(self) -> list[str]:
        return [e.text for e in self.events if e.kind == "data"]

    @property
    def comments(self) -> list[str]:
        return [e.text for e in self.events if e.kind == "comment"]

    @property
    def chunks(self) -> list[dict[str, Any]]:
        """The JSON data payloads other than ``[DONE]``."""
        return chunks(self.events)

    @property
    def text(self) -> str:
        return content(self.chunks)

    def progress(self) -> list[dict[str, Any]]:
        """The ``: moa.progress {json}`` comments, decoded."""
        prefix = " moa.progress "
        return [orjson.loads(c[len(prefix) :]) for c in self.comments if c.startswith(prefix)]
