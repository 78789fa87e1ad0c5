"""Answer integrity, stream smoothness and cost: the pure measures of moa_stream.bench.integrity,
on answers a real small model wrote and on hand-computed streams."""

from __future__ import annotations

import io
from pathlib import Path

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from support.bench import DUO_CONFIG, MODELS

from moa_stream.bench import BenchSettings, run_bench
from moa_stream.bench.integrity import (
    OUTPUT_PRICE,
    PRICE_MODELS,
    answer_integrity,
    bill,
    bills,
    chat_template_texts,
    ended_early,
    fresh_words,
    inter_token_gaps,
    loops,
    restarts,
    stream_gaps,
    word_count,
)
from moa_stream.bench.report import (
    CellResult,
    RunSample,
    attach_one_shot,
    headline_sentence,
    reduction_note,
    render_integrity_table,
    summarize,
    ttft_reduction_interval,
    with_bill_ratios,
    with_reduction_intervals,
)
from moa_stream.engine.prompts import PromptTemplates
from moa_stream.sim import SimServer

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
    assert answer_integrity("Notes from other assistants on cats.").markup == ()
    header = answer_integrity("Notes from other assistants on the question, they say.")
    assert header.markup == ("Notes from other assistants on the question",)


def test_extra_prompt_texts_count_as_prompt() -> None:
    system = "You are a helpful pirate who always answers in rhyming couplets."
    answer = "Arr! I am a helpful pirate who always answers in rhyme."
    assert answer_integrity(answer).markup == ()
    assert answer_integrity(answer, prompt_texts=[system]).markup == (
        "a helpful pirate who always answers in",
    )


# What SmolLM2-135M wrote as an aggregator, word for word but shortened: the items of a list
# open differently and go on identically, until the token limit cuts one short.
LIST_LOOP = (
    "Here are some tips. 1. Drink water before you go to bed. The fifth tip is to stay away "
    "from the temptation of a glass of water before bed. The sixth tip is to stay away from "
    "the temptation of a glass of water before bed. The seventh tip is to stay away from the "
    "temptation of a glass of"
)


def test_a_list_that_loops_is_counted_by_its_body() -> None:
    assert restarts(LIST_LOOP) == 0  # every item opens differently
    assert loops(LIST_LOOP) == 2
    integrity = answer_integrity(LIST_LOOP)
    assert integrity.loops == 2 and integrity.restarts == 0
    # The sixth and seventh items are repetitions; the rest is fresh (the list number "1" is a
    # sentence of its own word).
    assert integrity.fresh_words == fresh_words(LIST_LOOP) == 4 + 1 + 7 + 17
    assert integrity.words == 4 + 1 + 7 + 17 + 17 + 14


@pytest.mark.parametrize("text", PROSE)
def test_ordinary_prose_does_not_loop(text: str) -> None:
    assert loops(text) == 0
    assert fresh_words(text) == word_count(text)


def test_a_list_whose_items_say_different_things_does_not_loop() -> None:
    items = (
        "The first tip is to drink water in the morning. The second tip is to walk for half an "
        "hour every day. The third tip is to sleep for at least seven hours a night."
    )
    assert loops(items) == 0 and fresh_words(items) == word_count(items)


def test_the_models_default_system_prompt_is_prompt_text() -> None:
    answer = "Hello! I am a helpful AI assistant named SmolLM, trained by Hugging Face. Blue."
    assert answer_integrity(answer).markup == (
        "a helpful AI assistant named SmolLM, trained by Hugging Face",
    )


def test_a_chat_templates_own_prose_is_found() -> None:
    template = (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are a careful assistant who answers in one short "
        "paragraph<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
        "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
        '{% if add_generation_prompt %}{{ "<|im_start|>assistant\n" }}{% endif %}'
    )
    assert chat_template_texts(template) == (
        "You are a careful assistant who answers in one short paragraph",
    )
    assert chat_template_texts("{{ bos_token }}{{ message['content'] }}") == ()


def test_an_answer_about_its_prompt_is_found_unless_the_question_asks_it() -> None:
    # What SmolLM2-135M wrote as an aggregator, instead of an answer.
    answer = (
        "Here is the edited response: This draft is not complete yet. Your edits to the "
        "message have improved it."
    )
    assert answer_integrity(answer).about_prompt == (
        "edited response",
        "draft",
        "Your edits",
        "the message",
    )
    asked = answer_integrity("Write a draft, then revise it.", question="How do I draft a CV?")
    assert asked.about_prompt == ()
    # The question's own subject, in another form, is not the prompt either.
    sent = answer_integrity(
        "The internet splits the message into packets.",
        question="Explain how the internet sends a message from one computer to another.",
    )
    assert sent.about_prompt == ()
    drafted = answer_integrity("The drafted letter says", question="What goes in a draft?")
    assert drafted.about_prompt == ()


def test_a_sentence_that_repeats_itself_is_a_loop() -> None:
    # SmolLM2-135M by appended turns: one sentence, never ended, to the token limit.
    endless = "The sky is a result of the blue sky" + " that is a result of the sky" * 6
    assert loops(endless) == 1 and loops("The sky is blue because air scatters light.") == 0


def test_the_status_note_copied_or_paraphrased_is_prompt_text() -> None:
    # SmolLM2-135M by prefill: the status note in its own words, then copied in part.
    answer = (
        "A note marked failing produced nothing, it may stop in mid-sentence and may not have "
        "reached its conclusion."
    )
    found = answer_integrity(answer)
    assert found.markup == ("mid-sentence and may not have reached its conclusion",)
    assert found.about_prompt == ("note marked",)


@pytest.mark.parametrize("text", PROSE)
def test_ordinary_prose_is_not_about_a_prompt(text: str) -> None:
    assert answer_integrity(text).about_prompt == ()


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


# -- in the bench's figures ----------------------------------------------------------------------


def _sample(
    index: int,
    text: str,
    chunks: tuple[float, ...],
    *,
    ttft: float | None = 0.5,
    prompt: int = 100,
    cached: int = 0,
    refs: tuple[float | None, ...] = (),
) -> RunSample:
    return RunSample(
        index=index,
        question_id=f"q{index}",
        ttft_s=ttft,
        total_s=(chunks[-1] if chunks else 1.0) + 0.1,
        prompt_tokens=prompt,
        completion_tokens=20,
        refs_complete=2,
        refs_partial=0,
        refs_failed=0,
        correct=None,
        cached_tokens=cached,
        text=text,
        chunk_times=chunks,
        reference_ends=refs,
    )


ONE_SHOT = " ".join(["word"] * 40) + "."


def test_a_cell_reports_integrity_smoothness_and_bills() -> None:
    single = CellResult(
        "single", "", "-", "s", 1, 1, [_sample(i, ONE_SHOT, (0.5, 0.6)) for i in range(2)], 1, 0
    )
    stair = CellResult(
        "staircase",
        "",
        "p",
        "s",
        1,
        1,
        [
            # Started over, copied a tag, stopped at 8 words while a proposer still wrote,
            # with a 1.5 s stall.
            _sample(0, STARTED_OVER + " </draft>", (0.5, 0.6, 2.1, 2.2), refs=(1.0, 3.0)),
            _sample(1, "Short and done.", (0.5, 0.7), refs=(0.4, 0.6), prompt=300, cached=200),
        ],
        1,
        0,
    )
    wait = CellResult(
        "wait-all", "", "w", "s", 1, 1, [_sample(i, ONE_SHOT, (1.0, 1.1)) for i in range(2)], 1, 0
    )
    cells = [single, stair, wait]
    attach_one_shot(cells)
    assert [s.one_shot_words for s in stair.samples] == [40, 40]
    rows = [summarize(c) for c in cells]
    with_bill_ratios(rows)
    row = rows[1]
    assert row["restarts_mean"] == 1.0 and row["restarts_answers"] == 1
    assert row["markup_answers"] == 1 and row["markup_examples"] == ["</draft>"]
    # The first answer: 30 words, while a proposer ran to 3.0 s: not below half of 40. The
    # second: 3 words after every proposer ended.
    assert row["ended_early_runs"] == 0 and row["ended_early_known"] == 2
    assert row["gaps_over_1s_mean"] == 0.5
    assert row["longest_gap_p50_s"] == pytest.approx((1.5 + 0.2) / 2)
    # Gaps pooled over runs: 0.1, 1.5, 0.1, 0.2.
    assert row["itl_p50_s"] == pytest.approx(0.15)
    assert row["bill_base"] == "wait-all"
    ratio = row["bill_vs_wait_all"]
    # Each run writes 20 completion tokens (80 units). Staircase: 100 + 80, and 300 prompt
    # tokens of which 200 cached + 80; wait-all: 100 + 80.
    assert ratio["no-cache"] == pytest.approx((180 + 380) / 2 / 180, abs=1e-3)
    assert ratio["cached-0.5x"] == pytest.approx((180 + 100 + 100 + 80) / 2 / 180, abs=1e-3)
    assert ratio["cached-0.1x-write-1.25x"] == pytest.approx(
        (205 + 125 + 20 + 80) / 2 / 205, abs=1e-3
    )
    assert rows[2]["bill_vs_wait_all"] == dict.fromkeys(ratio, 1.0)
    table = render_integrity_table(rows)
    assert table.splitlines()[3].startswith("| staircase | 1.00 | 1 of 2 | ")
    assert "`</draft>`" in table
    # Rows written before these figures existed: no table.
    old = {k: v for k, v in rows[0].items() if k != "restarts_mean"}
    assert render_integrity_table([old]) == ""


def test_an_early_ending_answer_is_counted() -> None:
    single = CellResult("single", "", "-", "s", 1, 1, [_sample(0, ONE_SHOT, (0.5,))], 1, 0)
    short = CellResult(
        "staircase", "", "p", "s", 1, 1, [_sample(0, "Too short.", (0.5, 0.6), refs=(2.0,))], 1, 0
    )
    attach_one_shot([single, short])
    assert summarize(short)["ended_early_runs"] == 1


def test_the_reduction_interval_is_paired_and_few_runs_are_called_indicative() -> None:
    base = [_sample(i, "", (1.0,), ttft=1.0 + 0.1 * i) for i in range(8)]
    fast = [_sample(i, "", (0.3,), ttft=0.3 + 0.05 * i) for i in range(8)]
    found = ttft_reduction_interval(fast, base)
    assert found is not None
    lo, hi, n = found
    assert n == 8 and 0.0 < lo <= hi < 1.0
    assert ttft_reduction_interval(fast, base) == found  # seeded
    assert ttft_reduction_interval(fast[:1], base) is None
    assert reduction_note([lo, hi], n).endswith("; 8 runs; indicative only)")
    assert reduction_note([0.5, 0.6], 120) == " (95% interval 50-60%; 120 paired runs)"
    assert reduction_note(None, None) == ""
    head = {
        "scenario": "s",
        "baseline": "reference-moa",
        "strategy": "quorum-2",
        "policy": "quorum(2)",
        "ttft_p50_s": 0.45,
        "baseline_ttft_p50_s": 1.35,
        "ttft_p50_reduction": 0.67,
        "fastest_strategy": "quorum-2",
        "quality_separates": False,
        "quality_silent_reason": "no quality was measured",
    }
    cells = [
        CellResult("reference-moa", "", "w", "s", 1, 1, base, 1, 0),
        CellResult("quorum-2", "", "q", "s", 1, 1, fast, 1, 0),
    ]
    with_reduction_intervals(head, cells)
    assert head["paired_runs"] == 8 and head["ttft_p50_reduction_ci95"] == [lo, hi]
    assert head["fastest_ttft_p50_reduction_ci95"] == [lo, hi]
    sentence = headline_sentence(head)
    assert f"by 67% (95% interval {100 * lo:.0f}-{100 * hi:.0f}%; 8 runs; indicative only)" in (
        sentence
    )


@pytest.mark.moa_sim(*MODELS, seed=0)
async def test_config_mode_reports_the_same_figures(tmp_path: Path, sim: SimServer) -> None:
    config = tmp_path / "bench.toml"
    config.write_text(DUO_CONFIG.format(base_url=sim.base_url, aggregator="agg"))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Why is the sky blue?\nName a prime number.\n")
    out = tmp_path / "out"
    settings = BenchSettings(
        out=out,
        config=config,
        prompts=prompts,
        strategies=("single", "wait-all", "staircase"),
        plots=False,
    )
    await run_bench(settings, io.StringIO())
    document = orjson.loads((out / "results.json").read_bytes())
    rows = {r["strategy"]: r for r in document["results"]}
    for row in rows.values():
        assert row["restarts_mean"] is not None and row["itl_p50_s"] is not None
        assert row["length_ratio_p50"] is not None  # against single's answers
        assert set(row["bill_vs_wait_all"]) == {m.name for m in PRICE_MODELS}
    assert rows["wait-all"]["bill_vs_wait_all"]["no-cache"] == 1.0
    assert rows["staircase"]["aggregator_requests_mean"] >= 1
    summary = (out / "summary.md").read_text()
    assert "| strategy | restarts / answer | answers with markup |" in summary
