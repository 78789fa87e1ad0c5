"""Raw-wire helpers for the simulator tests: read an SSE body as the bytes arrived."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

CHAT = "/chat/completions"


def body(content: str = "Tell me something.", model: str = "m", **extra: Any) -> dict[str, Any]:
    """A chat-completions request body with one user message."""
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


@dataclass
class Event:
    """One SSE line of interest: a ``data:`` payload or a ``:`` comment, with arrival time."""

    kind: str
    text: str
    at: float

    def json(self) -> Any:
        return orjson.loads(self.text)


def split_events(raw: bytes, at: float = 0.0) -> list[Event]:
    """Every data line and comment in a complete SSE body (LF framing, as the simulator writes)."""
    events = []
    for block in raw.decode().split("\n\n"):
        for line in block.split("\n"):
            if line.startswith(":"):
                events.append(Event("comment", line[1:].strip(), at))
            elif line.startswith("data: "):
                events.append(Event("data", line[len("data: ") :], at))
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
            events.extend(split_events(complete + sep, now))
            buf = rest
    if buf:
        events.extend(split_events(buf, time.monotonic()))
    return events


def chunks(events: list[Event]) -> list[dict[str, Any]]:
    """The JSON chunks of a stream (data events other than ``[DONE]``)."""
    return [e.json() for e in events if e.kind == "data" and e.text != "[DONE]"]


def content(chunk_list: list[dict[str, Any]]) -> str:
    """The streamed answer text."""
    return "".join(
        c["choices"][0]["delta"].get("content") or "" for c in chunk_list if c.get("choices")
    )


async def stream_text(
    session: aiohttp.ClientSession, base_url: str, payload: dict[str, Any]
) -> str:
    """Stream a request and return its text."""
    async with session.post(base_url + CHAT, json={**payload, "stream": True}) as resp:
        assert resp.status == 200, await resp.text()
        return content(chunks(await read_events(resp)))
