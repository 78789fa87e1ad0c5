"""Simulated models continue answers as faithfully as their ContinuationProfile says: restarts,
early stops and copied markup at their stated rates, prefill refusals on both routes, and the
perfect profile exactly as before."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from support.sim import CHAT

from moa_stream import ConfigError
from moa_stream.bench.scenarios import get_scenarios
from moa_stream.sim import (
    CONTINUATION_PROFILES,
    ContinuationProfile,
    LatencyProfile,
    SimModel,
    SimServer,
    load_sim_config,
)
from moa_stream.sim._continue import detect_continuation
from moa_stream.sim._flaws import PREFILL_REFUSAL, ends_at_boundary, markup_pieces, opening_of
from moa_stream.sim._plan import Plan, build_plan, parse_request

INSTANT = LatencyProfile.fixed(ttft=0.0, tokens_per_s=float("inf"))
SMALL = CONTINUATION_PROFILES["small"]
STRONG = CONTINUATION_PROFILES["strong"]
CONTINUE = (
    "Continue your answer from exactly where it stopped, taking this into account. Do not "
    "repeat what you already wrote and do not start over."
)
INSTRUCTIONS = (
    "Write your own answer to the user's message above. Do not mention the drafts or copy "
    "their tags."
)
FIRST_DRAFT = '<draft n="1" status="partial, still being written">'
UPDATE_DRAFT = '<draft n="1" status="partial, still being written" continued>'
# An aggregator's first request, then a step's update (the shape the staircase sends). The
# first is longer than the simulator's anchor, so later steps continue the text it planned.
PROMPT = (
    "Why is the sea salty?\n\nOther assistants drafted answers.\n\n"
    f"{FIRST_DRAFT}\n{'Rivers carry salt to it. ' * 30}\n</draft>\n\n{INSTRUCTIONS}"
)
UPDATE = f"The drafts went on.\n\n{UPDATE_DRAFT}\nInto the sea.\n</draft>"
N = 300


def model(profile: ContinuationProfile = SMALL, **kw: Any) -> SimModel:
    return SimModel(name="agg", latency=INSTANT, answer_tokens=80, continuation=profile, **kw)


def plan(m: SimModel, messages: Sequence[dict[str, Any]], *, seed: int = 0, **extra: Any) -> Plan:
    req = parse_request(orjson.dumps({"model": m.name, "messages": messages, **extra}))
    info = detect_continuation(
        req.messages,
        continue_final_message=req.continue_final_message,
        last_prefix=req.last_prefix,
        continue_trailing_assistant=m.continue_trailing_assistant,
    )
    return build_plan(m, req, seed=seed, continuation=info)


def text(p: Plan) -> str:
    return "".join(p.tokens)


def whole_answer(m: SimModel, sample: int, *, seed: int = 0) -> str:
    user = [{"role": "user", "content": PROMPT}]
    return text(plan(m, user, seed=seed, sim={"sample": sample}))


def prefill(m: SimModel, sample: int, answer: str, **kw: Any) -> Plan:
    messages = [
        {"role": "user", "content": f"{PROMPT}\n\n{UPDATE}"},
        {"role": "assistant", "content": answer},
    ]
    return plan(
        m,
        messages,
        continue_final_message=True,
        add_generation_prompt=False,
        sim={"sample": sample},
        **kw,
    )


def turns(m: SimModel, sample: int, answer: str, *, seed: int = 0) -> Plan:
    messages = [
        {"role": "user", "content": PROMPT},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": f"{UPDATE}\n\n{CONTINUE}"},
    ]
    return plan(m, messages, seed=seed, sim={"sample": sample})


def cut_at_sentence_end(whole: str, sample: int) -> str:
    ends = [m.end() for m in re.finditer(r"\. ", whole)]
    return whole[: ends[sample % len(ends)] - 1]  # keeps the full stop, drops the space


def cut_mid_sentence(whole: str, sample: int) -> str:
    # inside a sentence: after a word that has no full stop
    spaces = [m.start() for m in re.finditer(r"(?<=[a-z]) ", whole)]
    return whole[: spaces[sample % len(spaces)]]


def rate(plans: Sequence[Plan], flaw: str) -> float:
    return sum(flaw in p.continuation_flaws for p in plans) / len(plans)


# -- the rates ---------------------------------------------------------------------------------


def test_a_small_model_restarts_most_prefills_that_end_a_sentence() -> None:
    m = model()
    plans = []
    for i in range(N):
        answer = cut_at_sentence_end(whole_answer(m, i), i)
        assert ends_at_boundary(answer)
        plans.append(prefill(m, i, answer))
    assert 0.6 <= rate(plans, "restart") <= 0.8
    assert rate(plans, "early_stop") == 0.0  # early stops follow "continue" turns only


def test_a_small_model_rarely_restarts_a_prefill_cut_mid_sentence() -> None:
    m = model()
    plans = []
    for i in range(N):
        answer = cut_mid_sentence(whole_answer(m, i), i)
        assert not ends_at_boundary(answer)
        plans.append(prefill(m, i, answer))
    assert 0.04 <= rate(plans, "restart") <= 0.17


def test_a_small_model_restarts_after_a_continue_turn_and_often_stops_there() -> None:
    m = model()
    plans = [turns(m, i, cut_mid_sentence(whole_answer(m, i), i)) for i in range(N)]
    restarted = [p for p in plans if "restart" in p.continuation_flaws]
    assert 0.5 <= len(restarted) / N <= 0.7
    stopped = [p for p in restarted if "early_stop" in p.continuation_flaws]
    assert 0.35 <= len(stopped) / len(restarted) <= 0.65
    for p in stopped:
        assert p.finish_reason == "stop"
        assert 1 <= len(p.tokens) <= 8 + ("markup" in p.continuation_flaws)
    assert all(
        "restart" in p.continuation_flaws for p in plans if "early_stop" in p.continuation_flaws
    )


def test_a_small_model_copies_markup_from_the_request() -> None:
    m = model()
    tags, sentences = markup_pieces([("user", f"{PROMPT}\n\n{UPDATE}")])
    assert tags == ["</draft>", UPDATE_DRAFT]
    # the sentences after the first quoted block: the instructions, then the update's header
    assert sentences == [
        "Write your own answer to the user's message above.",
        "Do not mention the drafts or copy their tags.",
        "The drafts went on.",
    ]
    copied = []
    for i in range(N):
        p = prefill(m, i, cut_mid_sentence(whole_answer(m, i), i))
        if "markup" in p.continuation_flaws:
            copied.append(text(p))
    assert 0.2 <= len(copied) / N <= 0.4
    pieces = [*tags, *sentences]
    for reply in copied:
        assert any(piece in reply for piece in pieces), reply
    # each piece shows up: the closing tag, the update's opening tag line, the sentence
    for piece in pieces:
        assert any(piece in reply for reply in copied), piece


def test_after_a_continue_turn_the_instruction_itself_can_be_parroted() -> None:
    m = model(ContinuationProfile(copy_markup=1.0))
    replies = [text(turns(m, i, whole_answer(m, i)[:50])) for i in range(60)]
    assert any(CONTINUE.split(". ")[0] in reply for reply in replies)
    assert any(reply.startswith("</draft>\n") for reply in replies)


def test_no_markup_is_copied_from_a_request_without_any() -> None:
    m = model(ContinuationProfile(copy_markup=1.0))
    user = [{"role": "user", "content": "Why is the sea salty?"}]
    whole = text(plan(m, user))
    p = plan(
        m,
        [*user, {"role": "assistant", "content": whole[:40]}],
        continue_final_message=True,
        add_generation_prompt=False,
    )
    assert p.continuation_flaws == ()
    assert whole[:40] + text(p) == whole


def test_a_strong_model_rarely_restarts_and_never_mid_sentence() -> None:
    m = model(STRONG)
    at_end = []
    mid = []
    for i in range(N):
        whole = whole_answer(m, i)
        at_end.append(prefill(m, i, cut_at_sentence_end(whole, i)))
        mid.append(prefill(m, i, cut_mid_sentence(whole, i)))
    assert 0.0 < rate(at_end, "restart") <= 0.08
    assert rate(mid, "restart") == 0.0
    assert rate([*at_end, *mid], "markup") <= 0.04


# -- what a restart looks like -----------------------------------------------------------------


def test_a_restart_restates_the_answers_opening_then_goes_on() -> None:
    m = model(ContinuationProfile(restart_at_boundary=1.0, restart_after_turn=1.0))
    exact = model(CONTINUATION_PROFILES["perfect"])
    for i in range(20):
        whole = whole_answer(m, i)
        answer = cut_at_sentence_end(whole, i + 1)
        opening = opening_of(answer)
        assert opening and answer.startswith(opening)
        reply = text(prefill(m, i, answer))
        # a new line, the opening sentence again, then what the answer had not said yet
        assert reply.startswith(" \n" + opening), (answer, reply)
        rest = text(prefill(exact, i, answer)).lstrip()
        assert reply.endswith(rest)
        # after a "continue" turn the new turn begins with the restatement at once
        assert text(turns(m, i, answer)).startswith(opening)


def test_a_restart_of_an_answer_without_a_full_sentence_repeats_it_and_finishes_the_word() -> None:
    m = model(ContinuationProfile(restart_after_turn=1.0))
    whole = whole_answer(m, 0)
    answer = whole[: whole.index(" ", 10) - 2]  # mid-word, before any full stop
    assert "." not in answer
    reply = text(turns(m, 0, answer))
    assert reply.startswith(answer)
    assert answer + reply == answer + whole


def test_refusals_and_restarts_need_a_continuation() -> None:
    m = model(ContinuationProfile(restart_after_turn=1.0, refuse_prefill=1.0, copy_markup=1.0))
    p = plan(m, [{"role": "user", "content": PROMPT}])
    assert p.continuation is None and p.continuation_flaws == ()


# -- the perfect profile and determinism ------------------------------------------------------


def test_the_perfect_profile_continues_exactly_as_before() -> None:
    assert SimModel(name="agg").continuation == CONTINUATION_PROFILES["perfect"]
    assert CONTINUATION_PROFILES["perfect"].perfect and not SMALL.perfect
    default = replace(model(), continuation=ContinuationProfile())
    for i in range(30):
        whole = whole_answer(default, i)
        for answer in (cut_at_sentence_end(whole, i), cut_mid_sentence(whole, i)):
            p = prefill(default, i, answer)
            assert p.continuation_flaws == ()
            assert answer + text(p) == whole
            t = turns(default, i, answer)
            assert answer + text(t) == whole


def test_flaws_repeat_with_the_seed_and_change_with_it() -> None:
    m = model()

    def run(seed: int) -> list[tuple[tuple[str, ...], str]]:
        out: list[tuple[tuple[str, ...], str]] = []
        for i in range(40):
            answer = cut_mid_sentence(whole_answer(m, i, seed=seed), i)
            p = turns(m, i, answer, seed=seed)
            out.append((p.continuation_flaws, text(p)))
        return out

    assert run(7) == run(7)
    assert [f for f, _ in run(7)] != [f for f, _ in run(8)]


# -- on the wire -------------------------------------------------------------------------------


async def test_a_refused_prefill_is_an_anthropic_style_400_on_both_routes(
    session: aiohttp.ClientSession,
) -> None:
    m = model(ContinuationProfile(refuse_prefill=1.0))
    messages = [
        {"role": "user", "content": "Why is the sea salty?"},
        {"role": "assistant", "content": "Because"},
    ]
    async with SimServer(models=[m], seed=0) as sim:
        body = {
            "model": "agg",
            "messages": messages,
            "continue_final_message": True,
            "add_generation_prompt": False,
        }
        async with session.post(sim.base_url + CHAT, json=body) as resp:
            assert resp.status == 400
            error = (await resp.json())["error"]
        assert error["message"] == PREFILL_REFUSAL
        assert error["type"] == "invalid_request_error"
        assert sim.records[-1].continuation_flaws == ("refused",)
        assert sim.records[-1].outcome == "error"

        anthropic = {"model": "agg", "max_tokens": 100, "messages": messages}
        async with session.post(sim.base_url + "/messages", json=anthropic) as resp:
            assert resp.status == 400
            assert await resp.json() == {
                "type": "error",
                "error": {"type": "invalid_request_error", "message": PREFILL_REFUSAL},
            }
        # a conversation that ends with the user is answered
        async with session.post(
            sim.base_url + "/messages", json={**anthropic, "messages": messages[:1]}
        ) as resp:
            assert resp.status == 200
        async with session.post(
            sim.base_url + CHAT, json={"model": "agg", "messages": messages[:1]}
        ) as resp:
            assert resp.status == 200


async def test_the_messages_route_continues_a_final_assistant_message(
    session: aiohttp.ClientSession,
) -> None:
    m = model(CONTINUATION_PROFILES["perfect"])
    user = [{"role": "user", "content": "Why is the sea salty?"}]
    async with SimServer(models=[m], seed=0) as sim:
        payload = {"model": "agg", "max_tokens": 1000, "messages": user}
        async with session.post(sim.base_url + "/messages", json=payload) as resp:
            whole = (await resp.json())["content"][0]["text"]
        answer = whole[:30].rstrip()
        payload["messages"] = [*user, {"role": "assistant", "content": answer}]
        async with session.post(sim.base_url + "/messages", json=payload) as resp:
            rest = (await resp.json())["content"][0]["text"]
        assert sim.records[-1].continuation == "prefill"
    assert answer + rest == whole


async def test_a_small_model_restarts_on_the_wire_and_records_it(
    session: aiohttp.ClientSession,
) -> None:
    m = model(ContinuationProfile(restart_after_turn=1.0, stop_after_restart=1.0))
    async with SimServer(models=[m], seed=0) as sim:
        payload: dict[str, Any] = {
            "model": "agg",
            "messages": [{"role": "user", "content": PROMPT}],
        }
        async with session.post(sim.base_url + CHAT, json=payload) as resp:
            whole = (await resp.json())["choices"][0]["message"]["content"]
        answer = cut_at_sentence_end(whole, 1)
        payload["messages"] = [
            *payload["messages"],
            {"role": "assistant", "content": answer},
            {"role": "user", "content": f"{UPDATE}\n\n{CONTINUE}"},
        ]
        payload["stream"] = True
        async with session.post(sim.base_url + CHAT, json=payload) as resp:
            raw = (await resp.read()).decode()
        record = sim.records[-1]
    assert record.continuation == "turns"
    assert record.continuation_flaws == ("restart", "early_stop")
    assert record.finish_reason == "stop"
    deltas = [
        orjson.loads(line[6:])["choices"][0]["delta"].get("content") or ""
        for line in raw.splitlines()
        if line.startswith("data: {")
    ]
    reply = "".join(deltas)
    assert reply and answer.startswith(reply)


# -- context window and cache minimum ----------------------------------------------------------


async def test_a_context_window_counts_max_tokens_in_the_openai_style(
    session: aiohttp.ClientSession,
) -> None:
    models = [
        SimModel(name="oa", latency=INSTANT, answer_tokens=200, context_window=100),
        SimModel(
            name="ls",
            latency=INSTANT,
            answer_tokens=200,
            context_window=100,
            overflow="llama-server",
        ),
    ]
    user = [{"role": "user", "content": "x" * 200}]  # 50 tokens
    async with SimServer(models=models, seed=0) as sim:
        body = {"model": "oa", "messages": user, "max_tokens": 80}
        async with session.post(sim.base_url + CHAT, json=body) as resp:
            assert resp.status == 400
            error = (await resp.json())["error"]
        assert error["code"] == "context_length_exceeded"
        assert (
            "you requested 130 tokens (50 in the messages, 80 in the completion)"
            in (error["message"])
        )
        # without max_tokens the reply stops at the window
        async with session.post(sim.base_url + CHAT, json={**body, "max_tokens": None}) as resp:
            choice = (await resp.json())["choices"][0]
        assert choice["finish_reason"] == "length"
        assert sim.records[-1].completion_tokens == 50
        # llama-server does not count max_tokens: it stops the reply at the window
        async with session.post(sim.base_url + CHAT, json={**body, "model": "ls"}) as resp:
            assert resp.status == 200
            choice = (await resp.json())["choices"][0]
        assert choice["finish_reason"] == "length"
        assert sim.records[-1].completion_tokens == 50
        # the Messages API counts both, in its own words
        anthropic = {"model": "oa", "max_tokens": 80, "messages": user}
        async with session.post(sim.base_url + "/messages", json=anthropic) as resp:
            assert resp.status == 400
            message = (await resp.json())["error"]["message"]
        assert message.startswith("input length and `max_tokens` exceed context limit: 50 + 80")


async def test_cached_prefixes_below_the_minimum_are_not_reported(
    session: aiohttp.ClientSession,
) -> None:
    models = [
        SimModel(name="min", latency=INSTANT, answer_tokens=5, cache_min_prefix=1024),
        SimModel(name="any", latency=INSTANT, answer_tokens=5),
    ]

    async def cached(name: str, chars: int) -> int:
        prompt = "The same words again. " * (chars // 22)
        for tail in ("one", "two"):
            body = {
                "model": name,
                "messages": [{"role": "user", "content": prompt + tail}],
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            async with session.post(sim.base_url + CHAT, json=body) as resp:
                await resp.read()
        return sim.records[-1].cached_tokens

    async with SimServer(models=models, seed=0) as sim:
        assert await cached("any", 2000) > 400
        assert await cached("min", 2000) == 0  # about 500 tokens: under the minimum
        assert await cached("min", 6000) >= 1024


# -- configuration -----------------------------------------------------------------------------


def test_continuation_and_the_new_model_keys_load_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "sim.toml"
    path.write_text(
        "include_defaults = false\n"
        '[models.small]\nttft = 0.01\ntokens_per_s = 100\ncontinuation = "small"\n'
        "context_window = 2048\ncache_min_prefix = 1024\n"
        'overflow = "llama-server"\nsends_usage = false\n'
        "[models.claude]\nttft = 0.01\ntokens_per_s = 100\n"
        'continuation = { profile = "strong", refuse_prefill = 1.0 }\n'
        "[models.custom]\nttft = 0.01\ntokens_per_s = 100\n"
        "continuation = { restart_after_turn = 0.4 }\n",
        encoding="utf-8",
    )
    models = {m.name: m for m in load_sim_config(path).models}
    small = models["small"]
    assert small.continuation == SMALL
    assert (small.context_window, small.cache_min_prefix) == (2048, 1024)
    assert (small.overflow, small.sends_usage) == ("llama-server", False)
    assert models["claude"].continuation == replace(STRONG, refuse_prefill=1.0)
    assert models["custom"].continuation == ContinuationProfile(restart_after_turn=0.4)


@pytest.mark.parametrize(
    ("value", "where"),
    [
        ('"clumsy"', "sim.models.m.continuation"),
        ("{ restart_after_turn = 2 }", "sim.models.m.continuation.restart_after_turn"),
        ("{ restart = 0.5 }", "sim.models.m.continuation.restart"),
        ('{ profile = "nope" }', "sim.models.m.continuation.profile"),
        ("3", "sim.models.m.continuation"),
    ],
)
def test_bad_continuation_settings_name_the_field(tmp_path: Path, value: str, where: str) -> None:
    path = tmp_path / "sim.toml"
    path.write_text(
        f"[sim.models.m]\nttft = 0.01\ntokens_per_s = 100\ncontinuation = {value}\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as info:
        load_sim_config(path)
    assert where in str(info.value)


def test_a_bench_scenario_picks_the_aggregators_continuation_profile() -> None:
    small, strong, plain = get_scenarios(["long-form@small", "long-form@strong", "long-form"])
    assert (small.name, strong.name, plain.name) == (
        "long-form@small",
        "long-form@strong",
        "long-form",
    )
    assert small.aggregator.continuation == SMALL
    assert strong.aggregator.continuation == STRONG
    assert plain.aggregator.continuation == CONTINUATION_PROFILES["perfect"]
    assert small.scaled(0.1).aggregator.continuation == SMALL
    assert small.models[-1].continuation == SMALL
    assert all(p.continuation.perfect for p in small.proposers)
    with pytest.raises(KeyError, match="clumsy"):
        get_scenarios(["long-form@clumsy"])
    with pytest.raises(ValueError, match="continuation profile"):
        replace(plain, continuation_profile="clumsy")


def short_drafts(words: int) -> str:
    drafts = "\n\n".join(
        f'<draft n="{n}">\n{" ".join(["salt"] * (words - 1))} rivers.\n</draft>' for n in (1, 2, 3)
    )
    return (
        f"Why is the sea salty?\n\nOther assistants drafted answers.\n\n{drafts}\n\n{INSTRUCTIONS}"
    )


def test_a_small_model_loops_on_short_drafts_and_not_on_long_ones() -> None:
    m = model()
    short = [
        plan(m, [{"role": "user", "content": short_drafts(12)}], sim={"sample": i})
        for i in range(N)
    ]
    loops = [p for p in short if p.continuation_flaws == ("loop",)]
    assert 0.4 < len(loops) / N < 0.6  # the small profile's 0.5
    for p in loops:
        reply = text(p)
        first = opening_of(reply)
        assert reply.count(first) >= 3 and len(p.tokens) == 80
    long = [
        plan(m, [{"role": "user", "content": short_drafts(60)}], sim={"sample": i})
        for i in range(N)
    ]
    assert not any(p.continuation_flaws for p in long)
    # no quoted drafts, no loop; the perfect and strong profiles never loop
    bare = [plan(m, [{"role": "user", "content": "Why?"}], sim={"sample": i}) for i in range(N)]
    assert not any(p.continuation_flaws for p in bare)
    for profile in (CONTINUATION_PROFILES["perfect"], STRONG):
        m2 = model(profile)
        plans = [
            plan(m2, [{"role": "user", "content": short_drafts(12)}], sim={"sample": i})
            for i in range(N)
        ]
        assert not any(p.continuation_flaws for p in plans)


def test_quoted_drafts_re_rendered_in_place_keep_the_planned_text() -> None:
    """The anchor is the user's own words: a later step that quotes longer drafts in the same
    place continues the text the first step began."""
    m = model(CONTINUATION_PROFILES["perfect"])
    first = text(plan(m, [{"role": "user", "content": short_drafts(12)}]))
    answer = first[: len(first) // 2]
    later = plan(
        m,
        [{"role": "user", "content": short_drafts(30)}, {"role": "assistant", "content": answer}],
        continue_final_message=True,
        add_generation_prompt=False,
    )
    assert answer + text(later) == first
