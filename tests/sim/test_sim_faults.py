"""Every fault kind is observable on the wire, forced per request or drawn per seed."""

from __future__ import annotations

import time

import aiohttp
import orjson
import pytest
from support.requests import body
from support.sim import CHAT, PROMPT, SIM_MODEL, SIM_MODELS, stream_text
from support.sse import chunks, content, read_events
from support.timing import LoopLag

from moa_stream import ConfigError
from moa_stream.sim import FAULT_KINDS, FaultProfile, LatencyProfile, SimModel, SimServer

# The simulator fixture: two fast models, "m" and "other".
pytestmark = pytest.mark.moa_sim(*SIM_MODELS, seed=0)


def forced(kind: str, content_text: str = "Tell me something.", **sim: object) -> dict[str, object]:
    return body(SIM_MODEL, content_text, stream=True, sim={"fault": kind, **sim})


async def test_rate_limit_is_a_429_with_retry_after(
    sim: SimServer, session: aiohttp.ClientSession
) -> None:
    async with session.post(
        sim.base_url + CHAT, json=forced("rate_limit", retry_after=0.25)
    ) as resp:
        assert resp.status == 429
        assert resp.headers["Retry-After"] == "1"
        assert resp.headers["retry-after-ms"] == "250"
        assert resp.headers["x-request-id"]
        error = orjson.loads(await resp.read())["error"]
    assert error["code"] == "rate_limit_exceeded"
    assert set(error) == {"message", "type", "param", "code"}
    assert sim.records[-1].outcome == "fault:rate_limit"


async def test_server_error_is_a_500_with_an_error_body(
    sim: SimServer, session: aiohttp.ClientSession
) -> None:
    async with session.post(sim.base_url + CHAT, json=forced("server_error")) as resp:
        assert resp.status == 500
        assert orjson.loads(await resp.read())["error"]["type"] == "server_error"
    assert sim.records[-1].outcome == "fault:server_error"


async def test_stall_first_delays_the_first_token(
    sim: SimServer, session: aiohttp.ClientSession
) -> None:
    sent = time.monotonic()
    async with session.post(sim.base_url + CHAT, json=forced("stall_first", stall_s=0.4)) as resp:
        assert resp.status == 200
        events = await read_events(resp)
    first_content = next(e for e in events if '"content":"' in e.text and '"role"' not in e.text)
    assert first_content.at - sent >= 0.4
    assert events[-1].text == "[DONE]"
    assert sim.records[-1].outcome == "fault:stall_first"


async def test_stall_mid_pauses_after_some_tokens(
    sim: SimServer, session: aiohttp.ClientSession
) -> None:
    async with (
        LoopLag() as lag,
        session.post(sim.base_url + CHAT, json=forced("stall_mid", stall_s=0.4, after=5)) as resp,
    ):
        events = await read_events(resp)
    tokens = [e for e in events if e.kind == "data" and '"content":"' in e.text]
    tokens = [e for e in tokens if '"role"' not in e.text]
    assert len(tokens) == 20
    assert tokens[5].at - tokens[4].at >= 0.35
    assert tokens[4].at - tokens[0].at < 0.3 + lag.worst
    assert events[-1].text == "[DONE]"
    assert sim.records[-1].outcome == "fault:stall_mid"


async def test_reset_mid_aborts_the_connection(
    sim: SimServer, session: aiohttp.ClientSession
) -> None:
    async with session.post(sim.base_url + CHAT, json=forced("reset_mid", after=5)) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientError):
            await resp.read()
    await sim.wait_idle(2)
    record = sim.records[-1]
    assert record.outcome == "fault:reset_mid"
    assert record.completion_tokens == 5
    assert sim.active_streams == 0


async def test_malformed_chunk_is_invalid_json_then_the_stream_goes_on(
    sim: SimServer, session: aiohttp.ClientSession
) -> None:
    async with session.post(sim.base_url + CHAT, json=forced("malformed", after=3)) as resp:
        events = await read_events(resp)
    bad = []
    for i, event in enumerate(events):
        if event.text == "[DONE]":
            continue
        try:
            orjson.loads(event.text)
        except orjson.JSONDecodeError:
            bad.append(i)
    assert len(bad) == 1
    assert events[-1].text == "[DONE]"
    good = [e for i, e in enumerate(events) if i not in bad]
    assert len(content(chunks(good)).split()) == 20
    assert sim.records[-1].outcome == "fault:malformed"


async def test_error_frame_arrives_inside_a_200_stream(
    sim: SimServer, session: aiohttp.ClientSession
) -> None:
    async with session.post(sim.base_url + CHAT, json=forced("error_frame", after=4)) as resp:
        assert resp.status == 200
        events = await read_events(resp)
    assert events[-1].text == "[DONE]"
    frames = [orjson.loads(e.text) for e in events[:-1]]
    assert set(frames[-1]) == {"error"}
    assert set(frames[-1]["error"]) == {"message", "type", "param", "code"}
    assert len(content(frames[:-1]).split()) == 4
    assert all(f["choices"][0]["finish_reason"] is None for f in frames[:-1])
    assert sim.records[-1].outcome == "fault:error_frame"


async def test_error_frame_can_come_before_any_content(
    sim: SimServer, session: aiohttp.ClientSession
) -> None:
    async with session.post(sim.base_url + CHAT, json=forced("error_frame", after=0)) as resp:
        events = await read_events(resp)
    assert next(orjson.loads(e.text) for e in events[:-1]).keys() == {"error"}


async def test_keepalive_comments_are_interleaved(
    sim: SimServer, session: aiohttp.ClientSession
) -> None:
    async with session.post(sim.base_url + CHAT, json=forced("keepalive")) as resp:
        events = await read_events(resp)
    assert events[0].kind == "comment"
    assert events[0].text == " keep-alive"
    assert sum(e.kind == "comment" for e in events) >= 2
    data = [e for e in events if e.kind == "data"]
    assert len(content(chunks(data)).split()) == 20
    assert data[-1].text == "[DONE]"
    assert sim.records[-1].outcome == "fault:keepalive"


async def test_keepalive_comments_fill_a_long_wait(session: aiohttp.ClientSession) -> None:
    model = SimModel(
        name="m",
        latency=LatencyProfile.fixed(ttft=0.5, tokens_per_s=1000),
        faults=FaultProfile(keepalive=1.0, keepalive_interval_s=0.1),
        answer_tokens=2,
    )
    async with (
        SimServer([model]) as sim,
        session.post(sim.base_url + CHAT, json=body(SIM_MODEL, PROMPT, stream=True)) as resp,
    ):
        events = await read_events(resp)
    first_data = next(i for i, e in enumerate(events) if e.kind == "data")
    assert first_data >= 4


async def test_times_and_key_fail_first_then_succeed(
    sim: SimServer, session: aiohttp.ClientSession
) -> None:
    statuses = []
    for i in range(4):
        payload = forced("rate_limit", f"attempt {i}", times=2, key="retry-test", retry_after=0)
        async with session.post(sim.base_url + CHAT, json=payload) as resp:
            statuses.append(resp.status)
            await resp.read()
    assert statuses == [429, 429, 200, 200]
    assert [r.outcome for r in sim.records] == [
        "fault:rate_limit",
        "fault:rate_limit",
        "complete",
        "complete",
    ]


async def test_times_without_key_counts_identical_requests(
    sim: SimServer, session: aiohttp.ClientSession
) -> None:
    payload = forced("server_error", times=1)
    codes = []
    for _ in range(2):
        async with session.post(sim.base_url + CHAT, json=payload) as resp:
            codes.append(resp.status)
            await resp.read()
    assert codes == [500, 200]


@pytest.mark.parametrize(
    ("kind", "check"),
    [("reset_mid", "client_error"), ("error_frame", "500"), ("malformed", "bad_json")],
)
async def test_non_streaming_requests_see_faults_too(
    sim: SimServer, session: aiohttp.ClientSession, kind: str, check: str
) -> None:
    payload = body(SIM_MODEL, PROMPT, sim={"fault": kind})
    if check == "client_error":
        with pytest.raises(aiohttp.ClientError):
            async with session.post(sim.base_url + CHAT, json=payload) as resp:
                await resp.read()
    else:
        async with session.post(sim.base_url + CHAT, json=payload) as resp:
            raw = await resp.read()
        if check == "500":
            assert resp.status == 500
            assert "error" in orjson.loads(raw)
        else:
            assert resp.status == 200
            with pytest.raises(orjson.JSONDecodeError):
                orjson.loads(raw)
    await sim.wait_idle(2)
    assert sim.records[-1].outcome == f"fault:{kind}"


async def test_random_faults_are_deterministic_per_seed(session: aiohttp.ClientSession) -> None:
    faults = FaultProfile(rate_limit=0.3, server_error=0.2)

    async def statuses(seed: int) -> list[int]:
        model = SimModel(name="m", faults=faults, answer_tokens=2)
        async with SimServer([model], seed=seed) as sim:
            result = []
            for i in range(30):
                async with session.post(sim.base_url + CHAT, json=body(SIM_MODEL, f"p{i}")) as resp:
                    result.append(resp.status)
                    await resp.read()
            return result

    first = await statuses(1)
    assert first == await statuses(1)
    assert first != await statuses(2)
    assert {200, 429, 500} == set(first)


async def test_a_retry_of_a_randomly_failed_request_draws_again(
    session: aiohttp.ClientSession,
) -> None:
    model = SimModel(name="m", faults=FaultProfile(server_error=0.5), answer_tokens=2)
    async with SimServer([model], seed=0) as sim:
        codes = []
        for _ in range(12):
            async with session.post(sim.base_url + CHAT, json=body(SIM_MODEL, "same")) as resp:
                codes.append(resp.status)
                await resp.read()
    assert set(codes) == {200, 500}


async def test_forced_requests_do_not_get_random_faults(session: aiohttp.ClientSession) -> None:
    model = SimModel(name="m", faults=FaultProfile(server_error=1.0), answer_tokens=3)
    async with SimServer([model]) as sim:
        text = await stream_text(
            session,
            sim.base_url,
            body(SIM_MODEL, PROMPT, sim={"fault": "rate_limit", "times": 0, "key": "k"}),
        )
    assert len(text.split()) == 3


def test_fault_probabilities_are_checked() -> None:
    assert FAULT_KINDS[-1] == "keepalive"
    with pytest.raises(ConfigError):
        FaultProfile(rate_limit=0.7, server_error=0.7)
    with pytest.raises(ConfigError):
        FaultProfile(stall_mid=-0.1)
