"""The latency model: seeded draws, fixed profiles on the wire, prefill, queueing, overrides."""

from __future__ import annotations

import asyncio
import math
import random
import statistics
import time

import aiohttp
import pytest
from support.requests import body
from support.sim import CHAT, PROMPT, SIM_MODEL, SIM_MODELS
from support.sse import chunks, read_events
from support.timing import LoopLag

from moa_stream import ConfigError
from moa_stream.sim import PROFILES, LatencyProfile, SimModel, SimServer, default_models
from moa_stream.sim._plan import build_plan, parse_request

# The simulator fixture: two fast models, "m" and "other".
pytestmark = pytest.mark.moa_sim(*SIM_MODELS, seed=0)


def test_seeded_draws_are_reproducible() -> None:
    profile = PROFILES["heavy-tail"]
    a = [profile.sample_ttft(random.Random(s), 100) for s in range(50)]
    b = [profile.sample_ttft(random.Random(s), 100) for s in range(50)]
    assert a == b
    assert len(set(a)) == 50
    assert profile.sample_gaps(random.Random(3), 40) == profile.sample_gaps(random.Random(3), 40)


def test_lognormal_ttft_matches_its_p50_and_p95() -> None:
    profile = LatencyProfile(ttft_p50=0.5, ttft_p95=2.0, tokens_per_s=100)
    rng = random.Random(0)
    draws = sorted(profile.sample_ttft(rng) for _ in range(20_000))
    assert draws[len(draws) // 2] == pytest.approx(0.5, rel=0.05)
    assert draws[int(len(draws) * 0.95)] == pytest.approx(2.0, rel=0.08)


def test_ttft_max_caps_the_tail() -> None:
    profile = LatencyProfile(ttft_p50=0.5, ttft_p95=5.0, tokens_per_s=100, ttft_max=1.0)
    rng = random.Random(0)
    assert max(profile.sample_ttft(rng) for _ in range(2000)) == 1.0


def test_decode_jitter_keeps_the_mean_rate() -> None:
    profile = LatencyProfile(ttft_p50=0.1, tokens_per_s=50, decode_jitter=0.5)
    gaps = profile.sample_gaps(random.Random(0), 20_001)
    assert statistics.fmean(gaps) == pytest.approx(1 / 50, rel=0.03)
    assert statistics.pstdev(gaps) > 0.005


def test_fixed_profile_has_no_randomness_and_prefill_adds_time() -> None:
    profile = LatencyProfile.fixed(ttft=0.2, tokens_per_s=100, prefill_tokens_per_s=1000)
    assert profile.ttft_sigma == 0.0
    assert profile.sample_ttft(random.Random(1), 500) == pytest.approx(0.7)
    assert profile.sample_gaps(random.Random(1), 4) == [0.01, 0.01, 0.01]
    instant = LatencyProfile.fixed(ttft=0, tokens_per_s=math.inf)
    assert instant.sample_gaps(random.Random(1), 3) == [0.0, 0.0]


def test_scaled_profile_is_proportionally_faster() -> None:
    fast = PROFILES["medium"].scaled(0.1)
    assert fast.ttft_p50 == pytest.approx(PROFILES["medium"].ttft_p50 * 0.1)
    assert fast.tokens_per_s == pytest.approx(PROFILES["medium"].tokens_per_s * 10)
    assert fast.ttft_sigma == pytest.approx(PROFILES["medium"].ttft_sigma)


def test_invalid_profiles_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="ttft_p95"):
        LatencyProfile(ttft_p50=1.0, ttft_p95=0.5, tokens_per_s=10)
    with pytest.raises(ConfigError, match="tokens_per_s"):
        LatencyProfile(ttft_p50=1.0, tokens_per_s=0)


def test_builtin_profiles_and_default_models() -> None:
    assert set(PROFILES) >= {"small-fast", "medium", "large-slow", "heavy-tail"}
    for profile in PROFILES.values():
        assert profile.ttft_p95 is not None
        assert profile.ttft_p95 > profile.ttft_p50
    ttfts = {name: PROFILES[name].ttft_p50 for name in ("small-fast", "medium", "large-slow")}
    assert ttfts["small-fast"] < ttfts["medium"] < ttfts["large-slow"]
    names = [m.name for m in default_models()]
    assert names == ["small-fast", "medium", "large-slow", "heavy-tail", "aggregator"]


def test_timing_redraws_per_occurrence_but_text_does_not() -> None:
    model = SimModel(name="m", latency=PROFILES["heavy-tail"], answer_tokens=30)
    req = parse_request(b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}')
    first = build_plan(model, req, seed=1, occurrence=0)
    same = build_plan(model, req, seed=1, occurrence=0)
    retry = build_plan(model, req, seed=1, occurrence=1)
    assert first.offsets == same.offsets
    assert first.offsets != retry.offsets
    assert first.tokens == retry.tokens


async def test_fixed_ttft_and_rate_hold_on_the_wire(session: aiohttp.ClientSession) -> None:
    model = SimModel(
        name="m", latency=LatencyProfile.fixed(ttft=0.2, tokens_per_s=100), answer_tokens=20
    )
    async with SimServer([model]) as sim:
        sent = time.monotonic()
        async with (
            LoopLag() as lag,
            session.post(sim.base_url + CHAT, json=body(SIM_MODEL, PROMPT, stream=True)) as resp,
        ):
            events = await read_events(resp)
        content_events = [e for e in events if e.kind == "data" and '"content":"' in e.text]
        content_events = [e for e in content_events if '"content":""' not in e.text]
        ttft = content_events[0].at - sent
        duration = content_events[-1].at - content_events[0].at
        (record,) = sim.records
    # Never early; late by no more than the loop was anyway, plus a margin.
    assert 0.19 <= ttft < 0.6 + lag.worst
    assert 0.17 <= duration < 0.6 + lag.worst  # 19 gaps of 10 ms
    # The plan itself, apart from the time spent reading the request.
    assert record.scheduled_ttft_s is not None and record.queued_s is not None
    assert record.scheduled_ttft_s - record.queued_s == pytest.approx(0.2, abs=1e-6)
    assert record.first_token_sent_at is not None
    assert record.first_token_sent_at >= record.received_at + 0.2
    x_sim = chunks(events)[1]["x_sim"]
    assert x_sim["first_token_at"] == record.first_token_sent_at
    assert x_sim["scheduled_ttft_s"] == record.scheduled_ttft_s


async def test_prefill_scales_with_prompt_length(session: aiohttp.ClientSession) -> None:
    latency = LatencyProfile.fixed(ttft=0.01, tokens_per_s=1000, prefill_tokens_per_s=10_000)
    async with SimServer([SimModel(name="m", latency=latency, answer_tokens=3)]) as sim:
        async with session.post(sim.base_url + CHAT, json=body(SIM_MODEL, "x" * 8000)) as resp:
            await resp.read()
        (record,) = sim.records
    assert record.prompt_tokens == 2000
    assert record.scheduled_ttft_s is not None and record.queued_s is not None
    assert record.scheduled_ttft_s - record.queued_s == pytest.approx(0.21, abs=1e-6)


async def test_sim_overrides_fix_ttft_and_length(
    sim: SimServer, session: aiohttp.ClientSession
) -> None:
    payload = body(SIM_MODEL, PROMPT, stream=True, sim={"ttft": 0.15, "tokens": 7})
    async with session.post(sim.base_url + CHAT, json=payload) as resp:
        parsed = chunks(await read_events(resp))
    assert len([c for c in parsed if c["choices"][0]["delta"].get("content")]) == 7
    (record,) = sim.records
    assert record.scheduled_ttft_s is not None and record.queued_s is not None
    assert record.scheduled_ttft_s - record.queued_s == pytest.approx(0.15, abs=1e-6)


async def test_slots_make_later_requests_queue(session: aiohttp.ClientSession) -> None:
    latency = LatencyProfile.fixed(ttft=0.15, tokens_per_s=1000)
    async with SimServer([SimModel(name="m", latency=latency, answer_tokens=3, slots=1)]) as sim:

        async def one(i: int) -> None:
            async with session.post(
                sim.base_url + CHAT, json=body(SIM_MODEL, f"q{i}", stream=True)
            ) as resp:
                await resp.read()

        async with LoopLag() as lag:
            await asyncio.gather(one(0), one(1), one(2))
        queued = sorted(r.queued_s or 0.0 for r in sim.records)
        ttfts = sorted(r.ttft_s or 0.0 for r in sim.records)
    assert queued[0] < 0.1 + lag.worst
    assert queued[1] >= 0.14
    assert queued[2] >= 0.28
    assert ttfts[2] >= 0.43


async def test_x_sim_reports_times_on_the_shared_monotonic_clock(
    sim: SimServer, session: aiohttp.ClientSession
) -> None:
    before = time.monotonic()
    async with session.post(sim.base_url + CHAT, json=body(SIM_MODEL, PROMPT, stream=True)) as resp:
        parsed = chunks(await read_events(resp))
    after = time.monotonic()
    x_sim = parsed[1]["x_sim"]
    assert before <= x_sim["received_at"] <= x_sim["first_token_at"] <= after
    assert x_sim["scheduled_first_token_at"] == pytest.approx(
        x_sim["received_at"] + x_sim["scheduled_ttft_s"]
    )
