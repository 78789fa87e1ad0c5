"""The MoA endpoints inside an existing aiohttp application: the server as a sub-application,
and the SSE helper in an application's own handler."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from support.integrations import MOA_IDS, config, leave_while_proposers_crawl, wait_for
from support.requests import body
from support.sse import sse_chunks, sse_items, sse_text

from moa_stream._wire import parse_chat_request
from moa_stream.config import Runtime
from moa_stream.integrations.aiohttp import add_moa_subapp, sse_response
from moa_stream.server.app import MoAServer

KEY = "sk-integ-0c5d"


async def hello(request: web.Request) -> web.Response:
    return web.Response(text="the host application")


async def make_client(app: web.Application) -> TestClient[web.Request, web.Application]:
    # aiohttp's test server runs with handler_cancellation=True, as the docs ask of a host
    # application: a client that disconnects cancels its handler.
    client = TestClient(TestServer(app))
    await client.start_server()
    return client


@pytest.fixture
async def runtime() -> AsyncIterator[Runtime]:
    async with Runtime(config()) as rt:
        yield rt


@pytest.fixture
async def host(runtime: Runtime) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    app = web.Application()
    app.router.add_get("/", hello)
    add_moa_subapp(app, runtime, prefix="/moa")
    client = await make_client(app)
    try:
        yield client
    finally:
        await client.close()


async def test_host_routes_and_moa_routes_live_side_by_side(
    host: TestClient[web.Request, web.Application],
) -> None:
    resp = await host.get("/")
    assert await resp.text() == "the host application"
    resp = await host.get("/moa/v1/models")
    assert resp.status == 200
    assert resp.headers["X-Request-Id"]  # the server's response hooks run below the prefix
    assert [m["id"] for m in (await resp.json())["data"]] == MOA_IDS
    resp = await host.get("/moa/healthz")
    assert resp.status == 200


async def test_openai_sdk_streams_and_completes_through_the_subapp(
    host: TestClient[web.Request, web.Application],
) -> None:
    base_url = str(host.make_url("/moa/v1"))
    async with openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0) as sdk:
        chunks = [
            c
            async for c in await sdk.chat.completions.create(
                model="fast", messages=[{"role": "user", "content": "Hi"}], stream=True
            )
        ]
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert len(text.split()) >= 5
        assert chunks[-1].choices[0].finish_reason == "stop"
        completion = await sdk.chat.completions.create(
            model="fast", messages=[{"role": "user", "content": "Hi"}]
        )
        assert completion.choices[0].message.content
        with pytest.raises(openai.NotFoundError, match="does not exist"):
            await sdk.chat.completions.create(
                model="nope", messages=[{"role": "user", "content": "Hi"}]
            )


async def test_chat_requests_under_the_prefix_are_counted_as_chat(
    host: TestClient[web.Request, web.Application],
) -> None:
    """The server's middleware recognises its chat path below the mount point."""
    resp = await host.post("/moa/v1/chat/completions", json=body())
    assert resp.status == 200
    state = host.app._subapps[0][MoAServer.KEY]
    assert state.metrics.requests.value("fast", "ok") == 1


async def test_api_keys_are_enforced_below_the_prefix() -> None:
    """Regression: the server looked for "/v1/" at the start of the path, so under a prefix
    every request skipped authentication."""
    async with Runtime(config(f'[server]\napi_keys = ["{KEY}"]\n')) as runtime:
        app = web.Application()
        add_moa_subapp(app, runtime, prefix="/moa/")
        client = await make_client(app)
        try:
            resp = await client.post("/moa/v1/chat/completions", json=body())
            assert resp.status == 401
            assert (await resp.json())["error"]["code"] == "invalid_api_key"
            resp = await client.get("/moa/v1/models", headers={"Authorization": f"Bearer {KEY}"})
            assert resp.status == 200
        finally:
            await client.close()


def test_prefix_must_be_absolute() -> None:
    with pytest.raises(ValueError, match="must start with '/'"):
        add_moa_subapp(web.Application(), Runtime(config()), prefix="moa")


async def test_disconnect_cancels_the_run(
    host: TestClient[web.Request, web.Application], runtime: Runtime
) -> None:
    """Proposers that would stream for 20 s end at once when the client goes away."""
    sim = runtime.sim

    async def client() -> None:
        async with host.post(
            "/moa/v1/chat/completions", json=body("crawl-proposers", stream=True)
        ) as resp:
            await resp.read()

    await leave_while_proposers_crawl(client(), sim)
    state = host.app._subapps[0][MoAServer.KEY]
    await wait_for(lambda: state.active == 0)


# -- the helper in an application's own handler ---------------------------------------------


@pytest.fixture
async def custom(runtime: Runtime) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    """An application with its own chat endpoint that answers through ``sse_response``."""

    async def chat(request: web.Request) -> web.StreamResponse:
        req = parse_chat_request(await request.read())
        run = runtime.moas[req.model].stream(req.messages)
        return await sse_response(
            request,
            run,
            model=req.model,
            include_usage=req.include_usage,
            progress=bool(req.body.get("moa_stream", {}).get("progress")),
            request_timeout=float(request.query.get("timeout", 30)),
            headers={"X-App": "mine"},
        )

    app = web.Application()
    app.router.add_post("/chat", chat)
    client = await make_client(app)
    try:
        yield client
    finally:
        await client.close()


async def test_helper_streams_the_servers_chunks(
    custom: TestClient[web.Request, web.Application],
) -> None:
    resp = await custom.post(
        "/chat",
        json=body(
            stream=True, stream_options={"include_usage": True}, moa_stream={"progress": True}
        ),
    )
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/event-stream"
    assert resp.headers["X-App"] == "mine"
    raw = await resp.read()
    chunks = sse_chunks(raw)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 12
    assert len(sse_text(raw).split()) >= 5
    comments = [text for kind, text in sse_items(raw) if kind == "comment"]
    assert any(c.startswith(" moa.progress ") for c in comments)


async def test_helper_answers_a_failed_run_with_an_error_status(
    custom: TestClient[web.Request, web.Application],
) -> None:
    """The aggregator fails before its first token: nothing was sent, so a 502 goes out."""
    resp = await custom.post("/chat", json=body("agg-broken"))
    assert resp.status == 502
    error = (await resp.json())["error"]
    assert error["code"] == "aggregator_failed"


async def test_helper_ends_a_stream_past_its_timeout_with_an_error_frame(
    custom: TestClient[web.Request, web.Application],
) -> None:
    """The answer has started when the deadline passes: an error frame and [DONE] end it."""
    resp = await custom.post("/chat?timeout=1.0", json=body("crawl-aggregator"))
    assert resp.status == 200
    data = [text for kind, text in sse_items(await resp.read()) if kind == "data"]
    assert data[-1] == "[DONE]"
    assert orjson.loads(data[-2])["error"]["code"] == "request_timeout"


async def test_helper_times_out_before_the_answer_with_504(
    custom: TestClient[web.Request, web.Application],
) -> None:
    resp = await custom.post("/chat?timeout=0.3", json=body("crawl-proposers"))
    assert resp.status == 504
    assert (await resp.json())["error"]["code"] == "request_timeout"


async def test_helper_disconnect_cancels_the_aggregator(
    custom: TestClient[web.Request, web.Application], runtime: Runtime
) -> None:
    sim = runtime.sim
    async with custom.post("/chat", json=body("crawl-aggregator")) as resp:
        assert resp.status == 200
        await resp.content.readuntil(b'"content":"')  # the role chunk
        await resp.content.readuntil(b'"content":"')  # a token
        resp.close()
    await sim.wait_idle(5)
    (record,) = [r for r in sim.records if r.model == "agg-crawl"]
    assert record.outcome == "client_disconnected"
    assert record.completion_tokens < 100


async def test_subapp_needs_no_aiohttp_session_of_its_own() -> None:
    """The sub-application shares the host's event loop and runner: a plain client works."""
    async with Runtime(config()) as runtime:
        app = web.Application()
        add_moa_subapp(app, runtime, prefix="/x")
        client = await make_client(app)
        try:
            async with aiohttp.ClientSession() as session:
                resp = await session.get(str(client.make_url("/x/v1/models/fast")))
                assert (await resp.json())["id"] == "fast"
        finally:
            await client.close()


async def test_helper_disconnect_before_the_answer_cancels_the_proposers(
    custom: TestClient[web.Request, web.Application], runtime: Runtime
) -> None:
    """Nothing has been written yet (the headers wait for the first token): the handler is
    cancelled, and the run with it."""
    sim = runtime.sim

    async def client() -> None:
        async with custom.post("/chat", json=body("crawl-proposers")) as resp:
            await resp.read()

    await leave_while_proposers_crawl(client(), sim)
