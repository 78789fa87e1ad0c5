"""Text is a pure function of (seed, model, prompt, sample): tests can assert on it."""

from __future__ import annotations

import random

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st
from support.requests import body
from support.sim import SIM_MODEL, SIM_MODELS, stream_text

from moa_stream.sim import SimModel, SimServer
from moa_stream.sim._rng import derive_seed, seeded_rng
from moa_stream.sim.textgen import VOCABULARY, apply_stop, count_prompt_tokens, generate_tokens

# The simulator fixture: two fast models, "m" and "other".
pytestmark = pytest.mark.moa_sim(*SIM_MODELS, seed=0)


def _models() -> list[SimModel]:
    return [SimModel(name="m", answer_tokens=30), SimModel(name="other", answer_tokens=30)]


async def test_same_seed_and_prompt_give_the_same_text_across_servers(
    session: aiohttp.ClientSession,
) -> None:
    async with SimServer(_models(), seed=7) as a, SimServer(_models(), seed=7) as b:
        text_a = await stream_text(session, a.base_url, body(SIM_MODEL, "Hello there"))
        again = await stream_text(session, a.base_url, body(SIM_MODEL, "Hello there"))
        text_b = await stream_text(session, b.base_url, body(SIM_MODEL, "Hello there"))
    assert text_a == again == text_b
    assert len(text_a.split()) == 30


async def test_seed_prompt_model_and_sample_each_change_the_text(
    session: aiohttp.ClientSession,
) -> None:
    async with SimServer(_models(), seed=7) as a, SimServer(_models(), seed=8) as b:
        base = await stream_text(session, a.base_url, body(SIM_MODEL, "Hello there"))
        other_seed = await stream_text(session, b.base_url, body(SIM_MODEL, "Hello there"))
        other_prompt = await stream_text(session, a.base_url, body(SIM_MODEL, "Hello there!"))
        other_model = await stream_text(session, a.base_url, body("other", "Hello there"))
        sample_1 = await stream_text(session, a.base_url, body(SIM_MODEL, "Hello there", seed=1))
        sample_2 = await stream_text(session, a.base_url, body(SIM_MODEL, "Hello there", seed=2))
        sim_sample = await stream_text(
            session, a.base_url, body(SIM_MODEL, "Hello there", sim={"sample": 1})
        )
    assert len({base, other_seed, other_prompt, other_model, sample_1, sample_2, sim_sample}) == 7


def test_text_looks_like_sentences_of_words() -> None:
    tokens = generate_tokens(random.Random(1), 200)
    assert len(tokens) == 200
    assert all(t.endswith(" ") for t in tokens[:-1])
    assert not tokens[-1].endswith(" ")
    text = "".join(tokens)
    assert text[0].isupper()
    assert text.endswith(".")
    vocab = set(VOCABULARY)
    assert all(w.strip(".,").lower() in vocab for w in text.split())


@given(st.integers(min_value=0, max_value=300), st.integers())
def test_generate_tokens_is_deterministic_and_exact_in_length(n: int, seed: int) -> None:
    assert generate_tokens(random.Random(seed), n) == generate_tokens(random.Random(seed), n)
    assert len(generate_tokens(random.Random(seed), n)) == n


@given(st.integers(min_value=1, max_value=60), st.integers(), st.data())
def test_apply_stop_cuts_exactly_before_the_first_stop(
    n: int, seed: int, data: st.DataObject
) -> None:
    tokens = generate_tokens(random.Random(seed), n)
    text = "".join(tokens)
    start = data.draw(st.integers(min_value=0, max_value=len(text) - 1))
    stop = text[start : start + data.draw(st.integers(min_value=1, max_value=8))]
    kept, stopped = apply_stop(tokens, [stop])
    assert stopped
    assert "".join(kept) == text[: text.index(stop)]
    assert all(kept)


def test_apply_stop_without_a_match_keeps_everything() -> None:
    tokens = ["Hello ", "world."]
    assert apply_stop(tokens, ["zzz", ""]) == (tokens, False)


def test_prompt_tokens_are_about_a_quarter_of_the_characters() -> None:
    assert count_prompt_tokens([""]) == 1
    assert count_prompt_tokens(["abcd"]) == 1
    assert count_prompt_tokens(["abcde"]) == 2
    assert count_prompt_tokens(["a" * 4000, "b" * 400]) == 1100


def test_derived_seeds_are_stable_and_separate_parts() -> None:
    assert derive_seed("a", 1) == derive_seed("a", 1)
    assert derive_seed("ab", "c") != derive_seed("a", "bc")
    # A fixed value: the same in every process and on every Python version.
    assert derive_seed("moa", 0) == 9938205393997678280
    assert seeded_rng("x").random() == seeded_rng("x").random()
