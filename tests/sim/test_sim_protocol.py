"""The simulator speaks canonical OpenAI chat completions on the wire."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
import pytest
from support.requests import body
from support.sim import CHAT, PROMPT, SIM_MODEL, SIM_MODELS, stream_text
from support.sse import chunks, content, read_events

from moa_stream.sim import SimServer

# The simulator fixture: two fast models, "m" and "other".
pytestmark = pytest.mark.moa_sim(*SIM_MODELS, seed=0)


async def test_stream_chunks_are_canonical_with_usage(
    sim: SimServer, session: aiohttp.ClientSession
) -> None:
    payload = body(SIM_MODEL, PROMPT, stream=True, stream_options={"include_usage": True})
    async with session.post(sim.base_url + CHAT, json=payload) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert resp.headers["x-request-id"]
        events = await read_events(resp)

    assert [e.kind for e in events] == ["data"] * len(events)
    assert events[-1].text == "[DONE]"
    parsed = chunks(events)
    first, *middle, finish, usage = parsed

    for chunk in parsed:
        assert set(chunk) >= {"id", "object", "created", "model", "choices", "usage"}
        assert chunk["object"] == "chat.completion.chunk"
        assert chunk["id"] == first["id"]
        assert chunk["created"] == first["created"]
        assert chunk["model"] == "m"
    for chunk in parsed[:-1]:
        assert chunk["usage"] is None
        (choice,) = chunk["choices"]
        assert set(choice) == {"index", "delta", "logprobs", "finish_reason"}
        assert choice["index"] == 0

    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all("role" not in c["choices"][0]["delta"] for c in middle)
    assert all(c["choices"][0]["finish_reason"] is None for c in [first, *middle])
    assert len(middle) == 20  # one chunk per token
    assert finish["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert usage["choices"] == []
    assert usage["usage"]["completion_tokens"] == 20
    assert usage["usage"]["total_tokens"] == (
        usage["usage"]["prompt_tokens"] + usage["usage"]["completion_tokens"]
    )
    # The timing field rides on the first content chunk only.
    assert "x_sim" in middle[0]
    assert all("x_sim" not in c for c in middle[1:])

    (record,) = sim.records
    assert record.outcome == "complete"
    assert record.request_id == resp.headers["x-request-id"] == middle[0]["x_sim"]["request_id"]
    assert record.completion_tokens == 20


async def test_stream_without_include_usage_has_no_usage(
    sim: SimServer, session: aiohttp.ClientSession
) -> None:
    async with session.post(sim.base_url + CHAT, json=body(SIM_MODEL, PROMPT, stream=True)) as resp:
        parsed = chunks(await read_events(resp))
    assert all("usage" not in c for c in parsed)
    assert parsed[-1]["choices"][0]["finish_reason"] == "stop"


async def test_streams_whatever_the_accept_header_says(
    sim: SimServer, session: aiohttp.ClientSession
) -> None:
    headers = {"Accept": "application/json"}
    async with session.post(
        sim.base_url + CHAT, json=body(SIM_MODEL, PROMPT, stream=True), headers=headers
    ) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        events = await read_events(resp)
    assert events[-1].text == "[DONE]"


async def test_non_streaming_completion_matches_the_streamed_text(
    sim: SimServer, session: aiohttp.ClientSession
) -> None:
    async with session.post(sim.base_url + CHAT, json=body(SIM_MODEL, PROMPT)) as resp:
        assert resp.status == 200
        assert resp.headers["x-request-id"]
        data = orjson.loads(await resp.read())
    assert data["object"] == "chat.completion"
    assert data["model"] == "m"
    (choice,) = data["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] == "stop"
    assert data["usage"]["completion_tokens"] == 20
    assert choice["message"]["content"] == await stream_text(
        session, sim.base_url, body(SIM_MODEL, PROMPT)
    )


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
async def test_max_tokens_cuts_with_finish_reason_length(
    sim: SimServer, session: aiohttp.ClientSession, field: str
) -> None:
    async with session.post(
        sim.base_url + CHAT, json={**body(SIM_MODEL, PROMPT, stream=True), field: 5}
    ) as resp:
        parsed = chunks(await read_events(resp))
    assert len([c for c in parsed if c["choices"][0]["delta"].get("content")]) == 5
    assert parsed[-1]["choices"][0]["finish_reason"] == "length"
    full = await stream_text(session, sim.base_url, body(SIM_MODEL, PROMPT))
    assert full.startswith(content(parsed))


async def test_stop_sequence_ends_the_text_before_it(
    sim: SimServer, session: aiohttp.ClientSession
) -> None:
    full = await stream_text(session, sim.base_url, body(SIM_MODEL, PROMPT))
    words = full.split(" ")
    stop = " " + words[len(words) // 2] + " "
    cut = await stream_text(
        session, sim.base_url, body(SIM_MODEL, PROMPT, stop=[stop, "never-there"])
    )
    assert cut == full[: full.index(stop)]
    async with session.post(sim.base_url + CHAT, json=body(SIM_MODEL, PROMPT, stop=stop)) as resp:
        data = orjson.loads(await resp.read())
    assert data["choices"][0]["message"]["content"] == cut
    assert data["choices"][0]["finish_reason"] == "stop"


async def test_models_endpoint_lists_every_model(
    sim: SimServer, session: aiohttp.ClientSession
) -> None:
    async with session.get(sim.base_url + "/models") as resp:
        assert resp.status == 200
        assert resp.headers["x-request-id"]
        data = orjson.loads(await resp.read())
    assert data["object"] == "list"
    assert [m["id"] for m in data["data"]] == ["m", "other"]
    for model in data["data"]:
        assert model["object"] == "model"
        assert isinstance(model["created"], int)
        assert isinstance(model["owned_by"], str)
    async with session.get(sim.base_url + "/models/other") as resp:
        assert orjson.loads(await resp.read())["id"] == "other"


_VALID = body(SIM_MODEL, PROMPT)


@pytest.mark.parametrize(
    ("raw", "status", "param", "code"),
    [
        (b"{not json", 400, None, "invalid_json"),
        (b"[1, 2]", 400, None, "invalid_type"),
        (
            orjson.dumps({"messages": _VALID["messages"]}),
            400,
            "model",
            "missing_required_parameter",
        ),
        (orjson.dumps({"model": "m"}), 400, "messages", "missing_required_parameter"),
        (orjson.dumps({**_VALID, "model": 3}), 400, "model", "invalid_type"),
        (orjson.dumps({**_VALID, "messages": "hi"}), 400, "messages", "invalid_type"),
        (orjson.dumps({**_VALID, "messages": []}), 400, "messages", "empty_array"),
        (
            orjson.dumps({**_VALID, "messages": [{"role": "user", "content": 5}]}),
            400,
            "messages[0].content",
            "invalid_type",
        ),
        (orjson.dumps({**_VALID, "max_tokens": "10"}), 400, "max_tokens", "invalid_type"),
        (orjson.dumps({**_VALID, "stream": "yes"}), 400, "stream", "invalid_type"),
        (orjson.dumps({**_VALID, "stop": [1]}), 400, "stop[0]", "invalid_type"),
        (orjson.dumps({**_VALID, "sim": {"fault": "nope"}}), 400, "sim.fault", "invalid_value"),
        (orjson.dumps({**_VALID, "model": "missing"}), 404, "model", "model_not_found"),
    ],
)
async def test_bad_requests_get_openai_error_bodies(
    sim: SimServer,
    session: aiohttp.ClientSession,
    raw: bytes,
    status: int,
    param: str | None,
    code: str,
) -> None:
    headers = {"Content-Type": "application/json"}
    async with session.post(sim.base_url + CHAT, data=raw, headers=headers) as resp:
        assert resp.status == status
        assert resp.headers["x-request-id"]
        assert resp.content_type == "application/json"
        data: dict[str, Any] = orjson.loads(await resp.read())
    error = data["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["code"] == code
    assert error["message"]
    (record,) = sim.records
    assert record.outcome == "error"
    assert record.status == status


async def test_unknown_fields_are_ignored(sim: SimServer, session: aiohttp.ClientSession) -> None:
    extra = {"temperature": 0.2, "top_p": 0.9, "logit_bias": {}, "user": "u", "whatever": [1]}
    assert await stream_text(
        session, sim.base_url, {**body(SIM_MODEL, PROMPT), **extra}
    ) == await stream_text(session, sim.base_url, body(SIM_MODEL, PROMPT))


async def test_content_parts_count_as_text(sim: SimServer, session: aiohttp.ClientSession) -> None:
    """Text parts are joined with newlines, as the server joins them."""
    parts = [{"type": "text", "text": "Tell me"}, {"type": "text", "text": "something."}]
    payload = {"model": "m", "messages": [{"role": "user", "content": parts}]}
    assert await stream_text(session, sim.base_url, payload) == await stream_text(
        session, sim.base_url, body(SIM_MODEL, "Tell me\nsomething.")
    )


async def test_unknown_routes_get_openai_errors_with_request_ids(
    sim: SimServer, session: aiohttp.ClientSession
) -> None:
    async with session.get(sim.base_url + "/nowhere") as resp:
        assert resp.status == 404
        assert resp.headers["x-request-id"]
        assert orjson.loads(await resp.read())["error"]["code"] == "unknown_url"
    async with session.get(sim.base_url + CHAT) as resp:
        assert resp.status == 405
        assert resp.headers["x-request-id"]
        assert "error" in orjson.loads(await resp.read())


async def test_model_name_appears_only_in_the_model_field(session: aiohttp.ClientSession) -> None:
    from moa_stream.sim import SimModel

    async with SimServer([SimModel(name="zebra", answer_tokens=200)]) as sim:
        payload = body("zebra", PROMPT, stream=True, stream_options={"include_usage": True})
        async with session.post(sim.base_url + CHAT, json=payload) as resp:
            raw = await resp.read()
    assert raw.count(b"zebra") == raw.count(b'"model":"zebra"')
