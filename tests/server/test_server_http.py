"""Raw HTTP: the wire format, and every bad input and fault mapped to an OpenAI error."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from support.http import AppServer
from support.requests import CHAT, body
from support.server import Running, config, serving, stream

from moa_stream.config import ServerConfig
from moa_stream.server.app import MoAServer, build_app
from moa_stream.testing import Script, ScriptedProvider


def assert_openai_error(payload: dict[str, Any], *, code: str | None, param: str | None) -> None:
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["code"] == code
    assert error["param"] == param


async def post_raw(
    session: aiohttp.ClientSession, url: str, data: bytes | Any, **kwargs: Any
) -> tuple[int, dict[str, Any], Any]:
    async with session.post(url + CHAT, data=data, **kwargs) as resp:
        return resp.status, orjson.loads(await resp.read()), resp.headers


# -- the stream ---------------------------------------------------------------------------------


async def test_stream_wire_format(srv: Running, session: aiohttp.ClientSession) -> None:
    sse = await stream(session, srv.url, body(stream_options={"include_usage": True}))
    assert sse.status == 200
    assert sse.headers["Content-Type"] == "text/event-stream"
    assert sse.headers["Cache-Control"] == "no-cache"
    assert sse.data[-1] == "[DONE]"
    chunks = sse.chunks
    role, *content, finish, usage = chunks
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all("role" not in c["choices"][0]["delta"] for c in [*content, finish])
    assert all(c["choices"][0]["finish_reason"] is None for c in [role, *content])
    assert finish["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert all(c["usage"] is None for c in chunks[:-1])
    assert usage["choices"] == []
    assert set(usage["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    assert len({(c["id"], c["created"], c["model"], c["object"]) for c in chunks}) == 1
    request_id = sse.headers["X-Request-Id"]
    assert chunks[0]["id"] == f"chatcmpl-{request_id}"


async def test_usage_adds_up_every_agent(srv: Running, session: aiohttp.ClientSession) -> None:
    sse = await stream(
        session,
        srv.url,
        body(stream_options={"include_usage": True}, moa_stream={"progress": True}),
    )
    report = sse.progress()[-1]["report"]
    agents = report["agents"]
    assert [a["role"] for a in agents] == ["proposer", "proposer", "aggregator"]
    usage = sse.chunks[-1]["usage"]
    assert usage["prompt_tokens"] == sum(a["usage"]["prompt_tokens"] for a in agents)
    assert usage["completion_tokens"] == sum(a["usage"]["completion_tokens"] for a in agents)


async def test_streams_whatever_the_accept_header(
    srv: Running, session: aiohttp.ClientSession
) -> None:
    sse = await stream(session, srv.url, body(), headers={"Accept": "application/json"})
    assert sse.status == 200 and sse.data[-1] == "[DONE]"


async def test_unknown_fields_are_accepted(srv: Running, session: aiohttp.ClientSession) -> None:
    extra = {"top_p": 0.5, "user": "u1", "tools": [], "seed": 3, "x_vendor": {"a": 1}}
    sse = await stream(session, srv.url, body(**extra))
    assert sse.status == 200 and sse.text


async def test_content_parts_are_joined(srv: Running, session: aiohttp.ClientSession) -> None:
    parts = [{"type": "text", "text": "Why is"}, {"type": "text", "text": "the sky blue?"}]
    payload = {"model": "single", "messages": [{"role": "user", "content": parts}]}
    async with session.post(srv.url + CHAT, json=payload) as resp:
        assert resp.status == 200
        assert (await resp.json())["choices"][0]["message"]["content"]


async def test_non_streaming_object(srv: Running, session: aiohttp.ClientSession) -> None:
    async with session.post(srv.url + CHAT, json=body(moa_stream={"progress": True})) as resp:
        assert resp.status == 200
        assert resp.content_type == "application/json"
        obj = await resp.json()
    assert obj["object"] == "chat.completion"
    assert obj["id"] == f"chatcmpl-{resp.headers['X-Request-Id']}"
    assert obj["choices"][0]["message"]["role"] == "assistant"
    assert obj["usage"]["total_tokens"] > 0
    # With progress asked for, the report rides along in a field clients ignore.
    assert obj["moa_stream"]["layers"][0]["reason"] == "all"


async def test_progress_stream_sends_headers_at_once(
    session: aiohttp.ClientSession,
) -> None:
    """With progress, headers and the proposers' start arrive long before the first token."""
    async with serving() as srv:
        payload = body("crawl-proposers", stream=True)
        async with session.post(
            srv.url + CHAT, json=payload, headers={"X-MoA-Progress": "1"}
        ) as resp:
            assert resp.status == 200
            line = await asyncio.wait_for(resp.content.readline(), 2)
            assert line.startswith(b": moa.progress ")
            assert orjson.loads(line[len(b": moa.progress ") :])["type"] == "proposer.started"


async def test_progress_items(srv: Running, session: aiohttp.ClientSession) -> None:
    sse = await stream(session, srv.url, body("degraded", moa_stream={"progress": True}))
    items = sse.progress()
    types = [p["type"] for p in items]
    assert types[:2] == ["proposer.started", "proposer.started"]
    assert types[-3:] == ["aggregator.started", "aggregator.done", "run.done"]
    failed = next(p for p in items if p["type"] == "proposer.failed")
    assert failed["agent"] == "broken" and failed["kind"] == "server"
    layer = next(p for p in items if p["type"] == "layer.done")
    assert layer["reason"] in ("all", "degraded")
    assert [r["agent"] for r in layer["references"] if r["status"] == "complete"] == ["a"]
    report = items[-1]["report"]
    assert report["ttft_s"] > 0 and report["time_to_quorum_s"] > 0
    assert "proposer.delta" not in types


# -- bad input ----------------------------------------------------------------------------------


def msg(role: str = "user", content: Any = "hi") -> dict[str, Any]:
    return {"role": role, "content": content}


BAD_BODIES: list[tuple[Any, str | None, str | None]] = [
    ({"messages": [msg()]}, "model", "missing_required_parameter"),
    ({"model": 3, "messages": [msg()]}, "model", "invalid_type"),
    ({"model": "fast"}, "messages", "missing_required_parameter"),
    ({"model": "fast", "messages": "hi"}, "messages", "invalid_type"),
    ({"model": "fast", "messages": []}, "messages", "empty_array"),
    ({"model": "fast", "messages": ["hi"]}, "messages[0]", "invalid_type"),
    (
        {"model": "fast", "messages": [msg(), {"content": "x"}]},
        "messages[1].role",
        "missing_required_parameter",
    ),
    ({"model": "fast", "messages": [msg(role="robot")]}, "messages[0].role", "invalid_value"),
    ({"model": "fast", "messages": [msg(), msg(content=5)]}, "messages[1].content", "invalid_type"),
    (
        {"model": "fast", "messages": [{"role": "user"}]},
        "messages[0].content",
        "missing_required_parameter",
    ),
    (
        {"model": "fast", "messages": [msg(content=[{"type": "text", "text": 1}])]},
        "messages[0].content[0].text",
        "invalid_type",
    ),
    (
        {
            "model": "fast",
            "messages": [
                msg(content=[{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {}}])
            ],
        },
        "messages[0].content[1].type",
        "unsupported_content_type",
    ),
    ({"model": "fast", "messages": [msg()], "stream": "yes"}, "stream", "invalid_type"),
    ({"model": "fast", "messages": [msg()], "temperature": "hot"}, "temperature", "invalid_type"),
    ({"model": "fast", "messages": [msg()], "temperature": 3}, "temperature", "invalid_value"),
    ({"model": "fast", "messages": [msg()], "max_tokens": 0}, "max_tokens", "invalid_value"),
    (
        {"model": "fast", "messages": [msg()], "max_completion_tokens": 1.5},
        "max_completion_tokens",
        "invalid_type",
    ),
    ({"model": "fast", "messages": [msg()], "stop": ["a", 1]}, "stop[1]", "invalid_type"),
    ({"model": "fast", "messages": [msg()], "n": 2}, "n", "invalid_value"),
    (
        {"model": "fast", "messages": [msg()], "stream": True, "stream_options": []},
        "stream_options",
        "invalid_type",
    ),
    (
        {"model": "fast", "messages": [msg()], "moa_stream": {"progress": "on"}},
        "moa_stream.progress",
        "invalid_type",
    ),
    ([1, 2], None, "invalid_type"),
]


@pytest.mark.parametrize(("payload", "param", "code"), BAD_BODIES)
async def test_bad_bodies_are_400_naming_the_param(
    srv: Running, session: aiohttp.ClientSession, payload: Any, param: str | None, code: str
) -> None:
    status, error, _ = await post_raw(session, srv.url, orjson.dumps(payload))
    assert status == 400
    assert_openai_error(error, code=code, param=param)
    assert error["error"]["type"] == "invalid_request_error"


async def test_malformed_json_is_400(srv: Running, session: aiohttp.ClientSession) -> None:
    status, error, _ = await post_raw(session, srv.url, b'{"model": "fast", "messages": [')
    assert status == 400
    assert_openai_error(error, code="invalid_json", param=None)


async def test_unknown_model_is_404(srv: Running, session: aiohttp.ClientSession) -> None:
    status, error, _ = await post_raw(session, srv.url, orjson.dumps(body("gpt-5")))
    assert status == 404
    assert_openai_error(error, code="model_not_found", param="model")
    async with session.get(srv.url + "/v1/models/gpt-5") as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "model_not_found"


async def test_body_over_the_limit_is_413() -> None:
    big = orjson.dumps(body(content="x" * 5000))
    async with serving(config(max_body_bytes=4096)) as srv, aiohttp.ClientSession() as session:
        # Declared length over the limit: refused before the body is read.
        status, error, _ = await post_raw(session, srv.url, big)
        assert status == 413
        assert_openai_error(error, code="request_too_large", param=None)

        # Chunked, no length: refused once the limit is crossed while reading.
        async def pieces() -> AsyncIterator[bytes]:
            for i in range(0, len(big), 1000):
                yield big[i : i + 1000]

        status, error, _ = await post_raw(session, srv.url, pieces())
        assert status == 413
        assert_openai_error(error, code="request_too_large", param=None)

        # Under the limit still works.
        status, _, _ = await post_raw(session, srv.url, orjson.dumps(body("single")))
        assert status == 200


async def test_wrong_method_is_405(srv: Running, session: aiohttp.ClientSession) -> None:
    async with session.get(srv.url + CHAT) as resp:
        assert resp.status == 405
        assert "POST" in resp.headers["Allow"]
        assert_openai_error(await resp.json(), code="method_not_allowed", param=None)


async def test_unknown_path_is_404_json(srv: Running, session: aiohttp.ClientSession) -> None:
    async with session.get(srv.url + "/v1/completions") as resp:
        assert resp.status == 404
        assert resp.content_type == "application/json"
        assert_openai_error(await resp.json(), code="not_found", param=None)


async def test_healthz(srv: Running, session: aiohttp.ClientSession) -> None:
    async with session.get(srv.url + "/healthz") as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "ok"}
    srv.state.begin_shutdown()
    async with session.get(srv.url + "/healthz") as resp:
        assert resp.status == 503
    status, error, _ = await post_raw(session, srv.url, orjson.dumps(body()))
    assert status == 503 and error["error"]["code"] == "shutting_down"


# -- faults -------------------------------------------------------------------------------------


async def test_aggregator_failing_before_its_first_token_is_502(
    srv: Running, session: aiohttp.ClientSession
) -> None:
    for payload in (body("agg-broken", stream=True), body("agg-broken")):
        status, error, _ = await post_raw(session, srv.url, orjson.dumps(payload))
        assert status == 502
        assert_openai_error(error, code="aggregator_failed", param=None)
        assert error["error"]["type"] == "upstream_error"


async def test_layer_failure_is_502(srv: Running, session: aiohttp.ClientSession) -> None:
    status, error, _ = await post_raw(session, srv.url, orjson.dumps(body("layer-raise")))
    assert status == 502
    assert_openai_error(error, code="layer_failed", param=None)


async def test_failure_after_the_stream_started_is_an_error_frame(
    srv: Running, session: aiohttp.ClientSession
) -> None:
    sse = await stream(session, srv.url, body("agg-midfail"))
    assert sse.status == 200
    *chunks, error, done = sse.data
    assert done == "[DONE]"
    assert_openai_error(orjson.loads(error), code="aggregator_failed", param=None)
    parsed = [orjson.loads(c) for c in chunks]
    assert parsed[0]["choices"][0]["delta"]["role"] == "assistant"
    # No finish chunk: the answer did not finish.
    assert all(c["choices"][0]["finish_reason"] is None for c in parsed)


async def test_a_failing_proposer_degrades_quietly(
    srv: Running, session: aiohttp.ClientSession
) -> None:
    sse = await stream(session, srv.url, body("degraded"))
    assert sse.status == 200 and sse.text and sse.data[-1] == "[DONE]"


async def test_over_the_concurrency_limit_is_429(session: aiohttp.ClientSession) -> None:
    async with serving(config(max_concurrent_streams=1)) as srv:
        payload = body("crawl-proposers", stream=True)
        async with session.post(
            srv.url + CHAT, json=payload, headers={"X-MoA-Progress": "1"}
        ) as first:
            await first.content.readline()
            assert srv.state.active == 1
            status, error, headers = await post_raw(session, srv.url, orjson.dumps(body()))
            assert status == 429
            assert headers["Retry-After"] == "1"
            assert_openai_error(error, code="too_many_concurrent_requests", param=None)
            assert error["error"]["type"] == "rate_limit_error"
            first.close()


# -- parameters reach the aggregator -----------------------------------------------------------


async def test_sampling_parameters_apply_to_the_aggregator(
    session: aiohttp.ClientSession, app_server: AppServer
) -> None:
    from moa_stream.engine.spec import Agent, moa

    provider = ScriptedProvider({"p": Script(("a",)), "agg": Script(("x", "y"))})
    spec = moa([Agent("p", provider, "p")], Agent("agg", provider, "agg"))
    app = build_app(MoAServer({"m": spec}, ServerConfig()))
    url = await app_server(app)
    payload = body("m", temperature=0.3, max_completion_tokens=7, max_tokens=9, stop="END")
    status, obj, _ = await post_raw(session, url, orjson.dumps(payload))
    assert status == 200
    assert obj["choices"][0]["message"]["content"] == "xy"
    proposer, aggregator = provider.requests
    assert (aggregator.temperature, aggregator.max_tokens, aggregator.stop) == (
        0.3,
        7,
        ("END",),
    )
    assert (proposer.temperature, proposer.max_tokens, proposer.stop) == (None, None, None)
    payload = body("m", stop=["A", "B"])
    await post_raw(session, url, orjson.dumps(payload))
    assert provider.requests[-1].stop == ("A", "B")
    assert provider.open_streams == 0


async def test_a_bug_is_an_opaque_500_or_error_frame(
    session: aiohttp.ClientSession, app_server: AppServer
) -> None:
    """An exception that is not an upstream error: logged, never shown to the client."""
    from moa_stream.engine.spec import Agent, single

    bug = RuntimeError("secret internals")
    provider = ScriptedProvider({"agg": Script(("x", "y"), error=bug, fail_after=1)})  # type: ignore[arg-type]
    app = build_app(MoAServer({"m": single(Agent("agg", provider, "agg"))}, ServerConfig()))
    url = await app_server(app)
    status, error, _ = await post_raw(session, url, orjson.dumps(body("m")))
    assert status == 500
    assert_openai_error(error, code="internal_error", param=None)
    assert "secret" not in error["error"]["message"]

    sse = await stream(session, url, body("m"))
    assert sse.status == 200
    *chunks, frame, done = sse.data
    assert done == "[DONE]"
    assert [orjson.loads(c)["choices"][0]["delta"].get("content") for c in chunks] == ["", "x"]
    assert_openai_error(orjson.loads(frame), code="internal_error", param=None)
    assert "secret" not in frame
    assert provider.open_streams == 0
