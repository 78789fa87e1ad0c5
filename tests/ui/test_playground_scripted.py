"""The page against a scripted stream: progress items the engine does not send today.

Staircase runs will send ``aggregator.step`` items, and later versions may add item types this
page does not know. A small aiohttp server on loopback serves the real page files and answers
the chat request with a fixed stream, written by the server's own encoders from real event
objects plus those extra items, so the page can be checked on them now: steps are marked in the
answer without changing its text, a partial reference is shown as such, and an unknown item is
listed and otherwise ignored, with no JavaScript error.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from aiohttp import web

from moa_stream._types import Usage
from moa_stream._wire import DONE, ChunkEncoder
from moa_stream.engine.events import (
    AgentReport,
    AggregatorDone,
    AggregatorStarted,
    LayerDone,
    LayerReport,
    ProposerDelta,
    ProposerDone,
    ProposerStarted,
    ReferenceInfo,
    RunDone,
    RunReport,
)
from moa_stream.server.playground import add_playground_routes
from moa_stream.server.progress import PREFIX, ProgressEncoder

pytest.importorskip("selenium", reason="selenium is not installed: pip install -e '.[ui]'")

from selenium.webdriver.common.by import By
from support.playground_page import finish, lanes, open_page

pytestmark = pytest.mark.ui

ANSWER = ["First step of the answer. ", "Second step, ", "with more references."]


def _item(payload: dict[str, Any]) -> bytes:
    return PREFIX + orjson.dumps(payload) + b"\n\n"


def scripted_stream() -> list[bytes]:
    """The frames of one run: two proposers, a partial reference, two steps, an unknown item."""
    progress = ProgressEncoder(text=True)
    chunks = ChunkEncoder("chatcmpl-scripted", 0, "moa-staircase", include_usage=True)
    refs = (ReferenceInfo("a", 0, "complete", 10, 3), ReferenceInfo("b", 1, "partial", 9, 2))
    usage = Usage(10, 12)
    agents = (
        AgentReport("a", "m", "p", "proposer", 0, 0, "complete", 0.0, 0.1, 0.3, usage, 10),
        AgentReport("b", "m", "p", "proposer", 0, 1, "complete", 0.0, 0.2, 0.9, usage, 30),
        AgentReport("agg", "m", "p", "aggregator", 0, 0, "complete", 0.35, 0.1, 0.8, usage, 60),
    )
    layers = (LayerReport(0, "partial", 0.35, refs),)
    report = RunReport("".join(ANSWER), "agg", 0.45, 0.35, 0.1, 1.2, usage, layers, agents, "stop")
    events: list[Any] = [
        ProposerStarted(0, 0, "a", 0.0),
        ProposerStarted(0, 1, "b", 0.0),
        ProposerDelta(0, 0, "a", "Alpha one ", 0.1),
        ProposerDelta(0, 1, "b", "Beta one ", 0.2),
        ProposerDone(0, 0, "a", "Alpha one ", "stop", usage, 0.1, 0.3),
        LayerDone(0, "partial", refs, None, None, 0.35),
        AggregatorStarted("agg", 0, 0.35),
    ]
    frames = [progress.frame(e) or b"" for e in events]
    frames.append(chunks.role() + chunks.content(ANSWER[0]))
    frames.append(progress.frame(ProposerDelta(0, 1, "b", "Beta two.", 0.6)) or b"")
    frames.append(
        _item(
            {
                "type": "aggregator.step",
                "step": 2,
                "references": [{"agent": "a", "status": "complete"}, {"agent": "b"}],
                "t": 0.7,
            }
        )
    )
    frames.append(chunks.content(ANSWER[1]))
    frames.append(_item({"type": "aggregator.step", "t": 0.9}))  # no step number, no references
    frames.append(_item({"type": "some.future.item", "detail": {"nested": [1, 2]}}))
    frames.append(_item({"type": "proposer.text", "layer": 5, "text": {"ghost": "?"}, "t": 1.0}))
    frames.append(chunks.content(ANSWER[2]))
    frames.append(progress.frame(ProposerDone(0, 1, "b", "x", "stop", usage, 0.2, 0.9)) or b"")
    frames.append(progress.frame(AggregatorDone("agg", "stop", usage, 0.1, 1.15)) or b"")
    frames.append(progress.frame(RunDone(report, 1.2)) or b"")
    frames.append(
        chunks.finish("stop") + chunks.usage(usage.prompt_tokens, usage.completion_tokens) + DONE
    )
    return frames


@contextlib.contextmanager
def scripted_server(frames: list[bytes]) -> Iterator[str]:
    """The page and a fixed chat stream, served from a thread of its own."""

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "moa-staircase"}]})

    async def chat(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for frame in frames:
            await response.write(frame)
            await asyncio.sleep(0.03)  # a stream, not one write: the page sees it arrive
        await response.write_eof()
        return response

    app = web.Application()
    add_playground_routes(app.router)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> web.AppRunner:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return runner

    runner = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def test_steps_partial_references_and_unknown_items(driver: Any) -> None:
    with scripted_server(scripted_stream()) as url:
        open_page(driver, url)
        driver.find_element(By.ID, "run").click()
        (panel,) = finish(driver, 1)
        answer = panel.find_element(By.CSS_SELECTOR, "[data-role=answer]")
        # The marks sit in the text but add no characters to it.
        text = driver.execute_script("return arguments[0].textContent", answer)
        assert text == "".join(ANSWER)
        steps = answer.find_elements(By.CSS_SELECTOR, ".mark.step")
        # The second item has no number: it is taken as the step after the last one.
        assert [s.get_attribute("data-label") for s in steps] == ["step 2", "step 3"]
        assert "a: complete" in steps[0].get_attribute("title")
        by_agent = lanes(panel)
        assert by_agent["b"].find_elements(By.CSS_SELECTOR, ".mark.cut"), "where b was cut"
        assert by_agent["b"].find_element(By.CSS_SELECTOR, ".lane-text").text.startswith("Beta one")
        log = panel.find_element(By.CSS_SELECTOR, ".log-list").get_attribute("textContent")
        assert "some.future.item" in log and "aggregator.step" in log
        assert panel.find_elements(By.CSS_SELECTOR, ".tl-line.step")
