"""The playground page's server side: its routes, turning it off, and the ``text`` progress level.

The page itself runs in a browser in ``tests/ui`` (``make test-ui``); these tests need none.
"""

from __future__ import annotations

import re
import signal
from collections import defaultdict
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from support.requests import CHAT, body
from support.serve_process import AUTH, serve_process, write_config
from support.server import CONFIG, Running, config, serving, stream

from moa_stream._exceptions import ConfigError
from moa_stream._types import Usage
from moa_stream._wire import WireError
from moa_stream.config import loads_config
from moa_stream.engine.events import (
    LayerDone,
    ProposerDelta,
    ProposerDone,
    ProposerFailed,
    ProposerStarted,
    ReferenceInfo,
    RunDone,
    RunReport,
)
from moa_stream.server.app import progress_level
from moa_stream.server.playground import FILES
from moa_stream.server.progress import PREFIX, TEXT_INTERVAL, ProgressEncoder

PLAYGROUND = Path(__file__).parents[2] / "moa_stream" / "server" / "playground"


# -- the routes -------------------------------------------------------------------------------


async def test_the_page_is_served_at_the_root_with_a_strict_policy(
    srv: Running, session: aiohttp.ClientSession
) -> None:
    async with session.get(srv.url + "/") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/html; charset=utf-8"
        page = await resp.text()
        csp = resp.headers["Content-Security-Policy"]
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert page == (PLAYGROUND / "index.html").read_text()
    # Only the page's own origin: no CDN, no inline script, nothing fetched from elsewhere.
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert "unsafe-inline" not in csp and "http" not in csp


@pytest.mark.parametrize("name", sorted(FILES))
async def test_every_file_is_served_with_its_type_and_revalidates(
    srv: Running, session: aiohttp.ClientSession, name: str
) -> None:
    async with session.get(f"{srv.url}/playground/{name}") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == FILES[name]
        assert await resp.read() == (PLAYGROUND / name).read_bytes()
        etag = resp.headers["ETag"]
    async with session.get(f"{srv.url}/playground/{name}", headers={"If-None-Match": etag}) as resp:
        assert resp.status == 304
        assert await resp.read() == b""


async def test_the_page_refers_only_to_files_that_are_served(
    srv: Running, session: aiohttp.ClientSession
) -> None:
    """Every src/href of the page is one of its own files (so it works offline)."""
    page = (PLAYGROUND / "index.html").read_text()
    refs = set(re.findall(r'(?:src|href)="([^"#]+)"', page))
    assert refs, "the page loads its script and style"
    for ref in refs:
        assert ref.startswith("/playground/"), ref
        async with session.get(srv.url + ref) as resp:
            assert resp.status == 200, ref


def test_the_files_fetch_nothing_from_elsewhere() -> None:
    """No URL of another origin anywhere (the SVG's XML namespace is a name, not a fetch)."""
    for name in FILES:
        text = (PLAYGROUND / name).read_text().replace('xmlns="http://www.w3.org/2000/svg"', "")
        assert not re.search(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", text, re.IGNORECASE), name


def _luminance(colour: str) -> float:
    channels = [int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5)]
    r, g, b = (c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def _contrast(a: str, b: str) -> float:
    high, low = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (high + 0.05) / (low + 0.05)


def test_text_colours_meet_wcag_aa_contrast() -> None:
    """Every text colour of the style sheet on the backgrounds it is drawn on: at least 4.5:1."""
    css = (PLAYGROUND / "style.css").read_text()
    var = dict(re.findall(r"--([a-z-]+):\s*(#[0-9a-f]{6})", css))
    pairs = [("text", "panel"), ("muted", "panel"), ("muted", "bg"), ("accent", "panel")]
    pairs += [("accent-text", "accent"), ("policy-fg", "policy-bg"), ("failed-fg", "panel")]
    for status in ("streaming", "complete", "partial", "failed", "cancelled", "waiting"):
        pairs += [(f"{status}-fg", f"{status}-bg"), (f"{status}-fg", "panel")]
    for fg, bg in pairs:
        ratio = _contrast(var[fg], var[bg])
        assert ratio >= 4.5, f"--{fg} on --{bg}: {ratio:.2f}:1"


async def test_unknown_playground_files_are_json_404s(
    srv: Running, session: aiohttp.ClientSession
) -> None:
    for path in ("/playground/nope.js", "/playground/../app.py", "/playground/"):
        async with session.get(srv.url + path) as resp:
            assert resp.status == 404, path
            assert (await resp.json())["error"]["code"] == "not_found"


async def test_the_page_needs_no_key_while_the_api_does(session: aiohttp.ClientSession) -> None:
    async with serving(config(api_keys=("sk-page",))) as running:
        async with session.get(running.url + "/") as resp:
            assert resp.status == 200
        async with session.get(running.url + "/v1/models") as resp:
            # The page reads this 401 as "ask for a key".
            assert resp.status == 401
            assert (await resp.json())["error"]["code"] == "invalid_api_key"


async def test_ui_false_leaves_the_page_out(session: aiohttp.ClientSession) -> None:
    async with serving(config(ui=False)) as running:
        for path in ("/", "/playground/app.js"):
            async with session.get(running.url + path) as resp:
                assert resp.status == 404, path
        async with session.get(running.url + "/v1/models") as resp:
            assert resp.status == 200


def test_ui_is_a_server_config_flag() -> None:
    assert loads_config(CONFIG).server.ui is True
    assert loads_config(CONFIG + "\n[server]\nui = false\n").server.ui is False
    with pytest.raises(ConfigError, match=r"server\.ui"):
        loads_config(CONFIG + '\n[server]\nui = "off"\n')


@pytest.mark.parametrize("workers", [1, 2])
async def test_no_ui_flag_turns_the_page_off(tmp_path: Path, workers: int) -> None:
    """``--no-ui`` reaches every worker; without it the same config serves the page."""
    path = write_config(tmp_path)
    async with aiohttp.ClientSession() as session:
        async with serve_process(path, "--no-ui", workers=workers) as proc:
            for _ in range(workers * 2):
                async with session.get(proc.url + "/", headers=AUTH) as resp:
                    assert resp.status == 404
            proc.process.send_signal(signal.SIGTERM)
            assert await proc.process.wait() == 0
        async with serve_process(path) as proc:
            async with session.get(proc.url + "/") as resp:
                assert resp.status == 200
            proc.process.send_signal(signal.SIGTERM)
            assert await proc.process.wait() == 0


# -- the text progress level ------------------------------------------------------------------


def test_text_level_is_asked_for_by_header_or_body() -> None:
    assert progress_level({}, None) == (False, False)
    for value in ("text", " Text "):
        assert progress_level({}, value) == (True, True)
    assert progress_level({}, "1") == (True, False)
    assert progress_level({}, "nonsense") == (False, False)
    assert progress_level({"progress": "text"}, None) == (True, True)
    assert progress_level({"progress": True}, None) == (True, False)
    with pytest.raises(WireError, match="boolean or"):
        progress_level({"progress": "loud"}, None)


def frames(raw: bytes | None) -> list[dict[str, Any]]:
    """The progress items in ``raw`` (one frame or several)."""
    if raw is None:
        return []
    return [orjson.loads(part[len(PREFIX) :]) for part in raw.split(b"\n\n") if part]


def test_text_is_batched_and_flushed_before_the_proposer_is_done() -> None:
    enc = ProgressEncoder(text=True)
    out: list[dict[str, Any]] = []
    out += frames(enc.frame(ProposerStarted(0, 0, "a", 0.0)))
    out += frames(enc.frame(ProposerStarted(0, 1, "b", 0.0)))
    # The first piece goes at once; the next ones wait for TEXT_INTERVAL to pass.
    step = TEXT_INTERVAL / 5
    pieces = [("a", "Hello "), ("b", "Hi "), ("a", "there "), ("b", "you "), ("a", "world.")]
    for i, (agent, text) in enumerate(pieces):
        out += frames(enc.frame(ProposerDelta(0, "ab".index(agent), agent, text, 1.0 + i * step)))
    texts = [item for item in out if item["type"] == "proposer.text"]
    assert texts[0]["text"] == {"a": "Hello "}
    late = TEXT_INTERVAL * 1.5 + 1.0
    out += frames(enc.frame(ProposerDelta(0, 1, "b", "again", late)))
    texts = [item for item in out if item["type"] == "proposer.text"]
    assert len(texts) == 2, "pieces within the interval are sent together"
    assert texts[1]["text"] == {"b": "Hi you again", "a": "there world."}
    out += frames(enc.frame(ProposerDelta(0, 0, "a", " More.", late + step)))
    done = frames(enc.frame(ProposerDone(0, 0, "a", "x", "stop", Usage(1, 5), 0.1, late + step)))
    assert [item["type"] for item in done] == ["proposer.text", "proposer.tokens", "proposer.done"]
    assert done[0]["text"] == {"a": " More."}


def test_text_is_flushed_before_failure_layer_end_and_run_end() -> None:
    enc = ProgressEncoder(text=True)
    enc.frame(ProposerStarted(0, 0, "a", 0.0))
    enc.frame(ProposerDelta(0, 0, "a", "first", 0.5))
    enc.frame(ProposerDelta(0, 0, "a", " cut", 0.51))
    failed = frames(enc.frame(ProposerFailed(0, 0, "a", "boom", "server", 0.52)))
    assert [(i["type"], i.get("text")) for i in failed] == [
        ("proposer.text", {"a": " cut"}),
        ("proposer.tokens", None),
        ("proposer.failed", None),
    ]
    enc.frame(ProposerDelta(0, 1, "b", "late", 0.53))
    ref = ReferenceInfo("b", 1, "partial", 4, 1)
    layer = frames(enc.frame(LayerDone(0, "partial", (ref,), None, None, 0.54)))
    assert [i["type"] for i in layer] == ["proposer.text", "proposer.tokens", "layer.done"]
    enc.frame(ProposerDelta(0, 1, "b", " straggler", 0.55))
    report = RunReport("", None, None, None, None, 0.6, Usage(), (), ())
    end = frames(enc.frame(RunDone(report, 0.6)))
    assert [i["type"] for i in end] == ["proposer.text", "proposer.tokens", "run.done"]
    assert end[0]["text"] == {"b": " straggler"}


def test_the_default_level_sends_no_text() -> None:
    enc = ProgressEncoder()
    out = frames(enc.frame(ProposerStarted(0, 0, "a", 0.0)))
    for i in range(20):
        out += frames(enc.frame(ProposerDelta(0, 0, "a", "secret ", i * 0.1)))
    out += frames(enc.frame(ProposerDone(0, 0, "a", "x", "stop", Usage(1, 20), 0.1, 2.0)))
    assert "proposer.text" not in {item["type"] for item in out}
    assert not any("secret" in orjson.dumps(item).decode() for item in out)


async def _proposer_texts(srv: Running, model: str) -> dict[str, str]:
    """Each proposer's whole text, from the engine itself, for the test prompt."""
    texts = {}
    async with srv.runtime.moas[model].stream(body(model)["messages"]) as run:
        async for event in run.events():
            if isinstance(event, ProposerDone):
                texts[event.agent] = event.text
    return texts


@pytest.mark.parametrize(
    ("headers", "options"),
    [({"X-MoA-Progress": "text"}, None), ({}, {"progress": "text"})],
    ids=["header", "body"],
)
async def test_text_level_forwards_every_proposers_whole_text(
    srv: Running,
    session: aiohttp.ClientSession,
    headers: dict[str, str],
    options: dict[str, Any] | None,
) -> None:
    payload = body("degraded") if options is None else body("degraded", moa_stream=options)
    sse = await stream(session, srv.url, payload, headers=headers)
    assert sse.status == 200
    items = sse.progress()
    got: dict[str, str] = defaultdict(str)
    ended: set[str] = set()
    for item in items:
        if item["type"] == "proposer.text":
            for agent, text in item["text"].items():
                assert agent not in ended, "text after the proposer was done"
                got[agent] += text
        elif item["type"] in ("proposer.done", "proposer.failed"):
            ended.add(item["agent"])
    done = {i["agent"]: i for i in items if i["type"] == "proposer.done"}
    # "degraded" has one proposer that answers and one that always fails before any text.
    assert set(done) == {"a"} and got["a"]
    assert len(got["a"]) == done["a"]["chars"]
    assert got == await _proposer_texts(srv, "degraded")
    # The answer is the same as without progress: the level changes the comments only.
    plain = await stream(session, srv.url, body("degraded"))
    assert sse.text == plain.text and not plain.comments


async def test_counts_level_is_unchanged(srv: Running, session: aiohttp.ClientSession) -> None:
    sse = await stream(session, srv.url, body("fast"), headers={"X-MoA-Progress": "1"})
    types = {item["type"] for item in sse.progress()}
    assert "proposer.done" in types and "proposer.text" not in types


async def test_text_level_on_a_request_that_fails_at_once(
    srv: Running, session: aiohttp.ClientSession
) -> None:
    """A bad body is still a 400 with the text level asked for by header."""
    async with session.post(
        srv.url + CHAT,
        json=body(moa_stream={"progress": "loud"}, stream=True),
        headers={"X-MoA-Progress": "text"},
    ) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert error["param"] == "moa_stream.progress" and '"text"' in error["message"]
