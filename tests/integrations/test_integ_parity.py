"""One serving path: the same requests through ``moa-stream serve``, the FastAPI router and the
aiohttp integration get the same status, headers and bodies.

Each request goes to three servers, each with a runtime of its own over the simulator's fixed
latencies (tests/support/server.py's config): the server at its root, the router and the
sub-application under ``/moa``. What differs by nature is normalised away: the request ids
(checked for their shape and their agreement with the completion id and the progress items,
then replaced), ``created``, times (``t``, ``ts``, ``*_s`` and the narration's seconds), the
headers each HTTP server adds on its own (``date``, ``server``, framing), and the prefix in an
unknown path's message. The order of items that concurrent proposers race for is not compared
(they are sorted), and neither are ``proposer.tokens`` items, which exist only when a run
outlasts their interval.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from fastapi import FastAPI
from support.asgi import uvicorn_serving
from support.http import serve_app
from support.requests import CHAT, body
from support.server import config, serving
from support.sse import parse_sse

from moa_stream.config import Runtime
from moa_stream.integrations.aiohttp import add_moa_subapp
from moa_stream.integrations.fastapi import moa_router

#: Headers every HTTP server sets its own way: not the answer's.
TRANSPORT_HEADERS = frozenset(
    {"date", "server", "content-length", "transfer-encoding", "connection", "keep-alive"}
)
REQUEST_ID = re.compile(r"^[0-9a-f]{32}$")
UPSTREAM_ID = re.compile(r"req_[0-9a-f]+")
SECONDS = re.compile(r"\d+\.\d+ s\b")


@contextlib.asynccontextmanager
async def via_serve() -> AsyncIterator[str]:
    async with serving(config()) as running:
        yield running.url


@contextlib.asynccontextmanager
async def via_fastapi() -> AsyncIterator[str]:
    async with Runtime(config()) as runtime:
        app = FastAPI()
        app.include_router(moa_router(runtime), prefix="/moa")
        async with uvicorn_serving(app) as url:
            yield url + "/moa"


@contextlib.asynccontextmanager
async def via_aiohttp() -> AsyncIterator[str]:
    async with Runtime(config()) as runtime:
        app = web.Application()
        add_moa_subapp(app, runtime, prefix="/moa")
        async with serve_app(app) as url:
            yield url + "/moa"


TARGETS: dict[str, Callable[[], contextlib.AbstractAsyncContextManager[str]]] = {
    "serve": via_serve,
    "fastapi": via_fastapi,
    "aiohttp": via_aiohttp,
}


@dataclass(frozen=True)
class Case:
    method: str
    path: str
    payload: dict[str, Any] | None = None
    headers: tuple[tuple[str, str], ...] = ()


CASES = {
    "stream-with-progress": Case(
        "POST",
        CHAT,
        body("fast", stream=True, stream_options={"include_usage": True}),
        (("X-MoA-Progress", "1"),),
    ),
    "stream-progress-text": Case(
        "POST", CHAT, body("fast", stream=True, moa_stream={"progress": "text"})
    ),
    "stream-reasoning-header": Case(
        "POST", CHAT, body("fast", stream=True), (("X-MoA-Reasoning", "1"),)
    ),
    "stream-degraded": Case("POST", CHAT, body("no-proposer", stream=True)),
    "whole": Case("POST", CHAT, body("fast")),
    "whole-with-progress": Case("POST", CHAT, body("fast", moa_stream={"progress": True})),
    "whole-degraded": Case("POST", CHAT, body("no-proposer")),
    "invalid-option-400": Case("POST", CHAT, body("fast", moa_stream={"reasoning": "x"})),
    "unknown-model-404": Case("POST", CHAT, body("nope", stream=True)),
    "failed-run-502": Case("POST", CHAT, body("agg-broken")),
    "models": Case("GET", "/v1/models"),
    "unknown-path-404": Case("GET", "/v1/nothing/here"),
    "wrong-method-405": Case("GET", CHAT),
}


def _times(value: Any) -> Any:
    """``value`` with every time replaced: keys ``t``, ``ts`` and ``*_s``, recursively."""
    if isinstance(value, dict):
        return {
            k: ("<time>" if v is not None and (k in ("t", "ts") or k.endswith("_s")) else _times(v))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_times(v) for v in value]
    return value


def _message(text: str) -> str:
    """An error message without what differs by nature: the upstream's request ids and the
    prefix an integration is mounted at."""
    return UPSTREAM_ID.sub("<upstream id>", text).replace("'/moa/v1/", "'/v1/")


def _completion(obj: dict[str, Any], request_id: str) -> dict[str, Any]:
    """A chunk or completion object with its id (checked) and ``created`` replaced."""
    assert obj["id"] == f"chatcmpl-{request_id}"
    normalised: dict[str, Any] = _times({**obj, "id": "<id>", "created": 0})
    return normalised


def _stream(raw: bytes, request_id: str) -> dict[str, Any]:
    """A stream's chunks in order (reasoning lines aside, sorted), its progress items sorted,
    with ``seq`` checked to count the items written, and its end."""
    answer: list[Any] = []
    reasoning: list[str] = []
    progress: list[str] = []
    data: list[str] = []
    seqs: list[int] = []
    for event in parse_sse(raw):
        if event.kind == "comment":
            tag, _, item_json = event.text.strip().partition(" ")
            assert tag == "moa.progress"
            item = orjson.loads(item_json)
            assert item.pop("request_id") == request_id
            seqs.append(item.pop("seq"))
            if item["type"] != "proposer.tokens":
                progress.append(orjson.dumps(_times(item), option=orjson.OPT_SORT_KEYS).decode())
            continue
        if event.text == "[DONE]" or event.text.startswith('{"error"'):
            data.append(_message(event.text))
            continue
        chunk = _completion(event.json(), request_id)
        delta = chunk["choices"][0]["delta"] if chunk["choices"] else {}
        if "reasoning_content" in delta:
            reasoning.append(SECONDS.sub("<t> s", delta["reasoning_content"]))
        else:
            answer.append(chunk)
    assert seqs == list(range(len(seqs)))
    return {
        "answer": answer,
        "reasoning": sorted(reasoning),
        "progress": sorted(progress),
        "end": data,
    }


async def ask(session: aiohttp.ClientSession, base: str, case: Case) -> dict[str, Any]:
    """The normalised status, headers and body of ``case`` asked of ``base``."""
    async with session.request(
        case.method, base + case.path, json=case.payload, headers=dict(case.headers)
    ) as resp:
        raw = await resp.read()
        status = resp.status
        headers = {k.lower(): v for k, v in resp.headers.items()}
    request_id = headers.pop("x-request-id")
    assert REQUEST_ID.match(request_id), request_id
    for name in TRANSPORT_HEADERS:
        headers.pop(name, None)
    result: dict[str, Any] = {"status": status, "headers": headers}
    if headers["content-type"].startswith("text/event-stream"):
        result["stream"] = _stream(raw, request_id)
    else:
        obj = orjson.loads(raw)
        if "error" in obj:
            obj["error"]["message"] = _message(obj["error"]["message"])
        elif obj.get("object") == "chat.completion":
            obj = _completion(obj, request_id)
        elif obj.get("object") == "list":
            # each model's ``created`` is its server's start: servers started a second apart
            obj["data"] = [{**m, "created": 0} for m in obj["data"]]
        result["body"] = obj
    return result


@pytest.mark.parametrize("name", list(CASES))
async def test_the_integrations_answer_as_serve_does(name: str) -> None:
    case = CASES[name]
    results: dict[str, dict[str, Any]] = {}
    async with aiohttp.ClientSession() as session:
        for target, start in TARGETS.items():
            async with start() as base:
                results[target] = await ask(session, base, case)
    expected = results.pop("serve")
    for target, got in results.items():
        assert got == expected, f"{target} differs from serve on {name}"


async def test_the_cases_cover_what_serve_sends() -> None:
    """The parity cases are not vacuous: serve's answers carry what they are meant to."""
    async with aiohttp.ClientSession() as session, via_serve() as base:
        stream = await ask(session, base, CASES["stream-with-progress"])
        assert stream["stream"]["progress"] and stream["stream"]["answer"]
        text = await ask(session, base, CASES["stream-progress-text"])
        assert any('"proposer.text"' in item for item in text["stream"]["progress"])
        reasoning = await ask(session, base, CASES["stream-reasoning-header"])
        assert reasoning["stream"]["reasoning"]
        degraded = await ask(session, base, CASES["whole-degraded"])
        assert degraded["headers"]["x-moa-degraded"] == "true"
        assert degraded["body"]["moa_stream"]["degraded"] is True
        invalid = await ask(session, base, CASES["invalid-option-400"])
        assert invalid["status"] == 400
        assert invalid["body"]["error"]["code"] == "invalid_type"
        assert invalid["headers"]["x-should-retry"] == "false"
        assert (await ask(session, base, CASES["unknown-model-404"]))["status"] == 404
        assert (await ask(session, base, CASES["failed-run-502"]))["status"] == 502
        wrong = await ask(session, base, CASES["wrong-method-405"])
        assert wrong["status"] == 405 and wrong["headers"]["allow"] == "POST"
