"""Answer integrity, stream smoothness and cost: the pure measures of moa_stream.bench.integrity,
on answers a real small model wrote and on hand-computed streams."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from moa_stream.bench.integrity import (
    OUTPUT_PRICE,
    PRICE_MODELS,
    answer_integrity,
    bill,
    bills,
    ended_early,
    inter_token_gaps,
    restarts,
    stream_gaps,
    word_count,
)
from moa_stream.engine.prompts import PromptTemplates

# A staircase answer of SmolLM2-135M that started over twice.
STARTED_OVER = (
    "The sky is blue. \nThe sky is indeed blue, \nThe sky is indeed blue because the air "
    "scatters the short wavelengths of sunlight more than the long ones."
)

# Answers that go somewhere: nothing in them starts over.
PROSE = (
    "The sky looks blue because of Rayleigh scattering. Sunlight contains every colour, and "
    "as it passes through the atmosphere the short blue wavelengths are scattered by the "
    "nitrogen and oxygen molecules far more than the long red ones. That scattered light "
    "reaches our eyes from every direction, so the whole sky glows blue. At sunset the light "
    "travels through much more air, the blue is scattered away before it reaches us, and the "
    "sky turns orange and red.\n\nIn short: the sky is blue because air scatters blue light "
    "best. The same effect makes distant mountains look bluish.",
    "1. Eat a balanced diet.\n2. Sleep seven to nine hours a night.\n3. Move every day, even "
    "if it is only a walk.\n\nEach of these helps on its own. Together they help more.",
    "A compiler translates source code into machine code. It reads the program, checks it "
    "for errors, and then produces an executable. An interpreter, by contrast, runs the "
    "program line by line. Yes. No. Maybe so.",
)


def test_the_real_restarts_are_counted() -> None:
    # "indeed" inserted the second time, then the second sentence repeated outright.
    assert restarts(STARTED_OVER) == 2
    assert restarts("The sky is blue. The sky is blue. The sky is blue.") == 2
    assert restarts("The sky is blue!\nthe SKY, is blue?") == 1


@pytest.mark.parametrize("text", PROSE)
def test_ordinary_prose_has_no_restarts_and_no_markup(text: str) -> None:
    integrity = answer_integrity(text)
    assert integrity.restarts == 0
    assert integrity.markup == ()
    assert not integrity.has_markup


def test_short_sentences_never_count() -> None:
    assert restarts("Yes. Yes. Yes. No. No.") == 0
    assert restarts("Step 1. Step 2. Step 3.") == 0


_WORDS = st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=8)


@given(st.lists(st.lists(_WORDS, min_size=4, max_size=12), min_size=1, max_size=8))
def test_sentences_with_distinct_openings_never_restart(sentences: list[list[str]]) -> None:
    # Make every opening distinct in its first two words, whatever was drawn.
    text = " ".join(f"w{i}a w{i}b {' '.join(words)}." for i, words in enumerate(sentences))
    assert restarts(text) == 0


@given(st.lists(_WORDS, min_size=4, max_size=12), st.lists(_WORDS, min_size=0, max_size=10))
def test_a_repeated_sentence_is_a_restart(sentence: list[str], between: list[str]) -> None:
    first = " ".join(sentence)
    middle = f"xx {' '.join(between)} yy." if between else ""
    assert restarts(f"{first}. {middle} {first}.") >= 1


def test_draft_tags_and_template_tokens_are_found_whole() -> None:
    answer = (
        'Rayleigh scattering.</draft>\n<draft n="1" status="partial, still being written" '
        "continued>\nThe sky<|im_end|>"
    )
    found = answer_integrity(answer).markup
    assert found == (
        "</draft>",
        '<draft n="1" status="partial, still being written" continued>',
        "<|im_end|>",
    )
    assert answer_integrity('It was status="complete" then.').markup == ('status="complete"',)
    assert answer_integrity("[INST] Why? [/INST] Because.").markup == ("[INST]", "[/INST]")


def test_parroted_instructions_are_found_as_written() -> None:
    t = PromptTemplates()
    answer = (
        "Light scatters. Continue your answer from exactly where it stopped, taking this into "
        "account! And so on."
    )
    (found,) = answer_integrity(answer).markup
    assert found == "Continue your answer from exactly where it stopped, taking this into account"
    assert found.lower() in t.continue_instruction.lower()
    # Five shared words are not enough; six are.
    assert answer_integrity("Other assistants drafted answers to cats.").markup == ()
    header = answer_integrity("Other assistants drafted answers to the message, they say.")
    assert header.markup == ("Other assistants drafted answers to the message",)


def test_extra_prompt_texts_count_as_prompt() -> None:
    system = "You are a helpful pirate who always answers in rhyming couplets."
    answer = "Arr! I am a helpful pirate who always answers in rhyme."
    assert answer_integrity(answer).markup == ()
    assert answer_integrity(answer, prompt_texts=[system]).markup == (
        "a helpful pirate who always answers in",
    )


def test_words_and_length_ratio() -> None:
    assert word_count("It's 3.5 km, isn't it?") == 6  # it's, 3, 5, km, isn't, it
    integrity = answer_integrity("one two three four five", one_shot_words=20)
    assert integrity.words == 5 and integrity.length_ratio == pytest.approx(0.25)
    assert answer_integrity("one two", one_shot_words=None).length_ratio is None
    assert answer_integrity("one two", one_shot_words=0).length_ratio is None


def test_stream_gaps_on_a_hand_computed_stream() -> None:
    # Chunks at 1.0, 1.1, 1.3, 2.5, 2.6 after a start at 0.5; the stream ended at 3.0.
    s = stream_gaps([1.0, 1.1, 1.3, 2.5, 2.6], start=0.5, end=3.0)
    # Gaps 0.1, 0.2, 1.2, 0.1: sorted 0.1, 0.1, 0.2, 1.2.
    assert s.chunks == 5
    assert s.ttft == pytest.approx(0.5)
    assert s.total == pytest.approx(2.5)
    assert s.itl_p50 == pytest.approx(0.15)
    assert s.itl_p99 == pytest.approx(0.2 + (1.2 - 0.2) * 0.97)
    assert s.longest == pytest.approx(1.2)
    assert s.stalls == 1


def test_stream_gaps_with_one_chunk_or_none() -> None:
    one = stream_gaps([2.0], start=1.0, end=4.0)
    assert (one.ttft, one.total, one.itl_p50, one.itl_p99, one.longest, one.stalls) == (
        1.0,
        3.0,
        None,
        None,
        0.0,
        0,
    )
    none = stream_gaps([], start=0.0, end=1.0)
    assert none.ttft is None and none.chunks == 0


@given(st.lists(st.floats(min_value=0.0, max_value=5.0), min_size=2, max_size=50))
def test_gap_statistics_are_ordered(steps: list[float]) -> None:
    times = []
    now = 0.0
    for step in steps:
        now += step
        times.append(now)
    s = stream_gaps(times, start=0.0, end=now + 1.0)
    assert s.itl_p50 is not None and s.itl_p99 is not None
    assert 0.0 <= s.itl_p50 <= s.itl_p99 + 1e-9 <= s.longest + 2e-9
    assert s.stalls == sum(1 for g in inter_token_gaps(times) if g > 1.0)
    assert s.stalls <= s.chunks - 1


def test_ended_early_needs_both_a_running_reference_and_a_short_answer() -> None:
    # 18 words where one-shot writes 160, while a proposer was still writing: early.
    assert ended_early(18, 160, answer_end=2.0, reference_ends=[1.5, 3.0]) is True
    assert ended_early(18, 160, answer_end=2.0, reference_ends=[1.5, None]) is True
    # Every reference was in: the short answer was the aggregator's choice.
    assert ended_early(18, 160, answer_end=2.0, reference_ends=[1.5, 1.9]) is False
    # Long enough.
    assert ended_early(100, 160, answer_end=2.0, reference_ends=[3.0]) is False
    # Nothing to compare with.
    assert ended_early(18, None, answer_end=2.0, reference_ends=[3.0]) is None
    assert ended_early(0, 160, answer_end=None, reference_ends=[3.0]) is None


def test_the_price_models() -> None:
    names = [m.name for m in PRICE_MODELS]
    assert names == ["no-cache", "cached-0.5x", "cached-0.1x-write-1.25x"]
    # 1,000 prompt tokens of which 800 cached, 100 completion tokens.
    assert bills(1000, 800, 100) == pytest.approx(
        {
            "no-cache": 1000 + OUTPUT_PRICE * 100,
            "cached-0.5x": 200 + 400 + OUTPUT_PRICE * 100,
            "cached-0.1x-write-1.25x": 1.25 * 200 + 80 + OUTPUT_PRICE * 100,
        }
    )
    assert bill(10, 0, 0, "cached-0.1x-write-1.25x") == pytest.approx(12.5)
    assert bill(10, 50, 0, PRICE_MODELS[1]) == pytest.approx(5.0)  # cached capped at prompt


@given(
    st.integers(min_value=0, max_value=10**6),
    st.integers(min_value=0, max_value=10**6),
    st.integers(min_value=0, max_value=10**5),
)
def test_caching_never_costs_more_than_no_cache_at_half_price(
    prompt: int, cached: int, completion: int
) -> None:
    b = bills(prompt, min(cached, prompt), completion)
    assert b["cached-0.5x"] <= b["no-cache"] + 1e-6
    assert b["no-cache"] == pytest.approx(prompt + OUTPUT_PRICE * completion)
