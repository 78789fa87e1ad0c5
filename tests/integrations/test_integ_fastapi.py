"""The MoA endpoints inside an existing FastAPI application: the router, and the SSE response
in an application's own endpoint. FastAPI's TestClient for the request/response shapes, a real
uvicorn for streaming with the openai SDK and for disconnects."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.testclient import TestClient
from starlette.responses import Response
from support.asgi import uvicorn_serving
from support.integrations import MOA_IDS, config, leave_while_proposers_crawl
from support.requests import body
from support.sse import sse_chunks, sse_items, sse_text

from moa_stream import ChatRequest
from moa_stream._wire import parse_chat_request
from moa_stream.config import Runtime
from moa_stream.engine.spec import Agent, MoA, single
from moa_stream.integrations.fastapi import SSEResponse, moa_router, sse_response
from moa_stream.testing import Script, ScriptedProvider, ScriptedStream


@pytest.fixture
async def runtime() -> AsyncIterator[Runtime]:
    async with Runtime(config()) as rt:
        yield rt


def host_app(runtime: Runtime, *, middleware: bool = False) -> FastAPI:
    """A host application with a route of its own, the MoA router under /moa, and a custom
    endpoint that answers through ``sse_response``; ``middleware`` adds an ``@app.middleware``
    (Starlette's BaseHTTPMiddleware, which wraps ``receive``), as many applications have."""
    app = FastAPI()
    if middleware:

        @app.middleware("http")
        async def tag(request: Request, call_next: Any) -> Response:
            response: Response = await call_next(request)
            response.headers["X-Tagged"] = "1"
            return response

    @app.get("/")
    async def index() -> dict[str, str]:
        return {"app": "host"}

    app.include_router(moa_router(runtime), prefix="/moa")

    @app.post("/ask")
    async def ask(request: Request) -> Response:
        req = parse_chat_request(await request.body())
        timeout = float(request.query_params.get("timeout", 30))
        return sse_response(
            runtime.moas[req.model].stream(req.messages),
            model=req.model,
            progress=bool(req.body.get("moa_stream", {}).get("progress")),
            request_timeout=timeout,
            headers={"X-App": "mine"},
        )

    return app


@pytest.fixture(params=[False, True], ids=["plain", "with-middleware"])
async def served(runtime: Runtime, request: pytest.FixtureRequest) -> AsyncIterator[str]:
    async with uvicorn_serving(host_app(runtime, middleware=request.param)) as url:
        async with aiohttp.ClientSession() as session, session.get(url + "/") as resp:
            assert ("X-Tagged" in resp.headers) is request.param
        yield url


# -- request and response shapes, through FastAPI's TestClient ------------------------------


def scripted_moas() -> dict[str, MoA]:
    provider = ScriptedProvider({"m": Script(tokens=("Fine", " thanks", "."))})
    return {"solo": single(Agent("solo", provider, "m"))}


def test_router_with_test_client() -> None:
    """The shapes the OpenAI API has: models, completions, chunks and errors."""
    app = FastAPI()
    app.include_router(moa_router(scripted_moas(), descriptions={"solo": "one model"}))
    with TestClient(app) as client:
        models = client.get("/v1/models").json()
        assert models["object"] == "list"
        assert [(m["id"], m["description"]) for m in models["data"]] == [("solo", "one model")]
        assert client.get("/v1/models/solo").json()["id"] == "solo"
        missing = client.get("/v1/models/other")
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "model_not_found"

        completion = client.post("/v1/chat/completions", json=body("solo")).json()
        assert completion["object"] == "chat.completion"
        assert completion["choices"][0]["message"]["content"] == "Fine thanks."

        resp = client.post("/v1/chat/completions", json=body("solo", stream=True))
        assert resp.status_code == 200
        assert resp.headers["content-type"] == "text/event-stream"
        assert sse_text(resp.content) == "Fine thanks."
        assert sse_chunks(resp.content)[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("payload", "status", "code"),
    [
        (b"{not json", 400, "invalid_json"),
        (orjson.dumps({"model": "solo"}), 400, "missing_required_parameter"),
        (orjson.dumps(body("gpt-4")), 404, "model_not_found"),
        (orjson.dumps(body("solo", n=2)), 400, "invalid_value"),
        (orjson.dumps(body("solo", content="x" * 5000)), 413, "request_too_large"),
    ],
)
def test_bad_requests_get_openai_error_bodies(payload: bytes, status: int, code: str) -> None:
    app = FastAPI()
    app.include_router(moa_router(scripted_moas(), max_body_bytes=4096))
    with TestClient(app) as client:
        resp = client.post("/v1/chat/completions", content=payload)
        assert resp.status_code == status
        assert resp.json()["error"]["code"] == code


def test_chunked_body_over_the_limit_is_refused() -> None:
    """A body without Content-Length is counted while it is read."""
    app = FastAPI()
    app.include_router(moa_router(scripted_moas(), max_body_bytes=100))
    with TestClient(app) as client:
        resp = client.post(
            "/v1/chat/completions", content=iter([b'{"model": "solo", ', b" " * 200, b"}"])
        )
        assert resp.status_code == 413


def test_host_dependencies_guard_the_router() -> None:
    """Authentication is the host's, as a dependency of include_router."""

    def auth(request: Request) -> None:
        if request.headers.get("authorization") != "Bearer yes":
            raise HTTPException(status_code=401)

    app = FastAPI()
    app.include_router(moa_router(scripted_moas()), dependencies=[Depends(auth)])
    with TestClient(app) as client:
        assert client.get("/v1/models").status_code == 401
        assert client.get("/v1/models", headers={"Authorization": "Bearer yes"}).status_code == 200


@pytest.mark.parametrize("prefix", ["", "/moa"])
def test_unknown_paths_and_methods_get_openai_errors(prefix: str) -> None:
    """Below the router's prefix (below /v1/ without one) a path or method it has no route
    for gets an OpenAI error, not FastAPI's {"detail": ...}; the application's own routes,
    those added after the router included, stay its own."""
    app = FastAPI()
    app.include_router(moa_router(scripted_moas()), prefix=prefix)

    @app.get("/later")
    async def later() -> dict[str, str]:
        return {"app": "host"}

    with TestClient(app) as client:
        assert client.get("/later").json() == {"app": "host"}
        missing = client.post(prefix + "/v1/nothing")
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "not_found"
        assert missing.headers["x-should-retry"] == "false"
        assert missing.headers["x-request-id"]
        wrong = client.delete(prefix + "/v1/models/solo")
        assert (wrong.status_code, wrong.headers["allow"]) == (405, "GET")
        assert wrong.json()["error"]["code"] == "method_not_allowed"
        assert client.get(prefix + "/v1/chat/completions").headers["allow"] == "POST"
        outside = client.get("/elsewhere")
        assert (outside.status_code, outside.json()) == (404, {"detail": "Not Found"})  # its own


def test_router_needs_a_moa() -> None:
    with pytest.raises(ValueError, match="at least one MoA"):
        moa_router({})


# -- a real uvicorn -------------------------------------------------------------------------


async def test_openai_sdk_through_the_router(served: str) -> None:
    async with aiohttp.ClientSession() as session, session.get(served + "/") as resp:
        assert await resp.json() == {"app": "host"}
    async with openai.AsyncOpenAI(
        base_url=served + "/moa/v1", api_key="unused", max_retries=0
    ) as sdk:
        assert [m.id for m in (await sdk.models.list()).data] == MOA_IDS
        stream = await sdk.chat.completions.create(
            model="fast",
            messages=[{"role": "user", "content": "Hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
        assert chunks[0].choices[0].delta.role == "assistant"
        assert {c.id for c in chunks} == {chunks[0].id}
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert len(text.split()) >= 5
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 12
        completion = await sdk.chat.completions.create(
            model="fast", messages=[{"role": "user", "content": "Hi"}]
        )
        assert completion.choices[0].message.content
        with pytest.raises(openai.APIStatusError) as caught:
            await sdk.chat.completions.create(
                model="agg-broken", messages=[{"role": "user", "content": "Hi"}], stream=True
            )
        assert caught.value.status_code == 502


@pytest.mark.parametrize("stream", [True, False])
async def test_disconnect_cancels_the_run(served: str, runtime: Runtime, stream: bool) -> None:
    """Proposers that would stream for 20 s end at once when the client goes away, whether
    the request was streamed (no byte sent yet) or not."""
    sim = runtime.sim

    async def client() -> None:
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                served + "/moa/v1/chat/completions", json=body("crawl-proposers", stream=stream)
            ) as resp,
        ):
            await resp.read()

    await leave_while_proposers_crawl(client(), sim)


async def test_disconnect_mid_answer_cancels_the_aggregator(served: str, runtime: Runtime) -> None:
    sim = runtime.sim
    async with (
        aiohttp.ClientSession() as session,
        session.post(served + "/ask", json=body("crawl-aggregator")) as resp,
    ):
        assert resp.status == 200
        assert resp.headers["X-App"] == "mine"
        await resp.content.readuntil(b'"content":"')  # the role chunk
        await resp.content.readuntil(b'"content":"')  # a token
        resp.close()
    await sim.wait_idle(5)
    (record,) = [r for r in sim.records if r.model == "agg-crawl"]
    assert record.outcome == "client_disconnected"
    assert record.completion_tokens < 100


async def test_sse_response_errors_and_timeouts(served: str) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(served + "/ask", json=body("agg-broken")) as resp:
            assert resp.status == 502
            assert (await resp.json())["error"]["code"] == "aggregator_failed"
        async with session.post(served + "/ask?timeout=0.3", json=body("crawl-proposers")) as resp:
            assert resp.status == 504
        async with session.post(served + "/ask?timeout=1", json=body("crawl-aggregator")) as resp:
            assert resp.status == 200
            data = [text for kind, text in sse_items(await resp.read()) if kind == "data"]
            assert data[-1] == "[DONE]"
            assert orjson.loads(data[-2])["error"]["code"] == "request_timeout"
        async with session.post(
            served + "/ask", json=body("fast", moa_stream={"progress": True})
        ) as resp:
            raw = await resp.read()
            assert any(
                text.startswith(" moa.progress ")
                for kind, text in sse_items(raw)
                if kind == "comment"
            )
            assert len(sse_text(raw).split()) >= 5


def test_sse_response_is_a_starlette_response() -> None:
    run = scripted_moas()["solo"].stream([{"role": "user", "content": "hi"}])
    response = sse_response(run, model="solo")
    assert isinstance(response, SSEResponse)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream"


def test_router_answers_503_until_its_runtime_starts() -> None:
    """The router can be made before the runtime starts (in a lifespan): the models are
    listed from the config, and chat requests are told to retry."""
    app = FastAPI()
    app.include_router(moa_router(Runtime(config())))
    with TestClient(app) as client:
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == MOA_IDS
        resp = client.post("/v1/chat/completions", json=body())
        assert resp.status_code == 503
        assert resp.headers["retry-after"] == "1"
        assert resp.json()["error"]["code"] == "not_ready"
        assert client.post("/v1/chat/completions", json=body("x")).status_code == 404


class CrashingProvider(ScriptedProvider):
    """A provider with a bug: its stream() raises something that is not a ProviderError."""

    def stream(self, request: ChatRequest) -> ScriptedStream:
        raise RuntimeError("a bug in a provider")


@pytest.mark.parametrize("stream", [False, True])
def test_a_crash_is_an_openai_500(stream: bool) -> None:
    """Regression: a non-streamed request whose run crashed got Starlette's plain-text 500."""
    app = FastAPI()
    app.include_router(moa_router({"bug": single(Agent("a", CrashingProvider({}), "m"))}))
    with TestClient(app, raise_server_exceptions=False) as client:
        resp = client.post("/v1/chat/completions", json=body("bug", stream=stream))
        assert resp.status_code == 500
        assert resp.json()["error"]["code"] == "internal_error"


def test_sse_response_in_a_plain_starlette_app() -> None:
    from starlette.applications import Starlette
    from starlette.routing import Route

    spec = scripted_moas()["solo"]

    async def ask(request: Request) -> Response:
        return sse_response(spec.stream([{"role": "user", "content": "hi"}]), model="solo")

    with TestClient(Starlette(routes=[Route("/ask", ask, methods=["POST"])])) as client:
        resp = client.post("/ask")
        assert resp.status_code == 200
        assert sse_text(resp.content) == "Fine thanks."
