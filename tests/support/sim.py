"""Helpers for the simulator tests: their models, and a request streamed to its text.

``body`` and the SSE reader are re-exported from ``requests`` and ``sse``.
"""

from __future__ import annotations

from typing import Any

import aiohttp

from moa_stream.sim import LatencyProfile, SimModel
from support.sse import chunks, content, read_events

FAST = LatencyProfile.fixed(ttft=0.02, tokens_per_s=500)

#: The chat route under the simulator's ``base_url`` (which ends in /v1).
CHAT = "/chat/completions"
#: The model of the simulator fixture in tests/sim and the prompt its tests send by default.
SIM_MODEL = "m"
PROMPT = "Tell me something."
SIM_MODELS = (
    SimModel(name="m", latency=FAST, answer_tokens=20),
    SimModel(name="other", latency=FAST, answer_tokens=20),
)


async def stream_text(
    session: aiohttp.ClientSession, base_url: str, payload: dict[str, Any]
) -> str:
    """Stream a request and return its text."""
    async with session.post(base_url + CHAT, json={**payload, "stream": True}) as resp:
        assert resp.status == 200, await resp.text()
        return content(chunks(await read_events(resp)))
