"""The staircase's defences against an aggregator that does not continue its own answer well.

Pure parts (where a step may end, the guard on a later step's first words), then whole runs on
scripted providers whose later steps restart, copy prompt markup, stall, stop at once, refuse
prefill or continue correctly. A rejected step never reaches the caller: the previous step's
stream, only paused, goes on.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st

from moa_stream import AggregatorError, ConfigError, RequestRejectedError, ServerError
from moa_stream._types import ChatRequest
from moa_stream.engine import Agent, Partial, moa
from moa_stream.engine.events import (
    AggregatorDone,
    AggregatorStep,
    AggregatorStepRejected,
    Event,
)
from moa_stream.engine.prompts import PromptTemplates
from moa_stream.engine.staircase import (
    LONG_SENTENCE,
    Continuation,
    ContinuationGuard,
    RepetitionGate,
    Staircase,
    cut_point,
    estimated_tokens,
    sentence_openings,
)
from moa_stream.testing import Script, ScriptedProvider, ScriptedStream

T = PromptTemplates()
INSTRUCTIONS = (T.instructions, T.header, T.update_header, T.continue_instruction)


# -- where a step may end --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "nxt", "ok"),
    [
        ("The sky is blue because", " light", True),  # leading-space tokens
        ("The sky is blue because ", "light ", True),  # trailing-space tokens
        ("The sky is blue.", " It", False),  # a sentence end invites a restart
        ("The sky is blue. ", "It ", False),
        ("The sky is", " blue", True),
        ("The sky", " is", False),  # too early in the sentence
        ("The sky is bl", "ue", False),  # mid-word
        ("The sky is blue because", "\nLight", False),
        ("First, the sky is blue,", " and", True),
        ("A list:\n- the sky is", " blue", True),
    ],
)
def test_a_step_ends_only_between_words_inside_a_sentence(answer: str, nxt: str, ok: bool) -> None:
    assert cut_point(answer, nxt) is ok


def test_sentence_openings_are_the_first_four_words() -> None:
    text = "The sky is blue. \nThe sky is indeed blue, because light scatters! Short one."
    assert sentence_openings(text) == {("the", "sky", "is", "blue"), ("the", "sky", "is", "indeed")}


# -- the guard -------------------------------------------------------------------------------


def judge(answer: str, pieces: list[str], *, end: bool = False) -> tuple[bool | None, str | None]:
    guard = ContinuationGuard(answer, INSTRUCTIONS, words=4)
    verdict: bool | None = None
    for piece in pieces:
        verdict = guard.feed(piece)
        if verdict is not None:
            return verdict, guard.reason
    if end:
        return guard.finish(), guard.reason
    return verdict, guard.reason


ANSWER = "The sky is blue. Sunlight is scattered by the air, and blue light"


@pytest.mark.parametrize(
    ("pieces", "reason"),
    [
        # the failures seen on a 135M model, as a later step's first words
        ([" \nThe", " sky", " is", " indeed", " blue"], "new line mid-sentence"),
        ([" is", " scattered. The", " sky", " is", " blue"], "restart"),
        ([" </draft>", " more"], "markup"),
        ([' <draft n="1" status="partial, still being written" continued>'], "markup"),
        ([" <|im_start|>assistant"], "markup"),
        ([" keep", " what", " is", " correct", " fix"], "instruction text"),
        # appended turns: a new reply glued onto the answer's last word
        (["You're", " an", " AI", " assistant"], "new sentence mid-sentence"),
    ],
)
def test_the_guard_rejects_restarts_markup_and_instructions(pieces: list[str], reason: str) -> None:
    assert judge(ANSWER, pieces) == (False, reason)


def test_a_whole_restart_glued_to_the_answer_is_caught() -> None:
    # appended turns: "The sky is blue. \nThe" then "The sky is blue. \nThe" again; caught
    # at its first word, glued onto the last one, before it makes a restart's four words
    assert judge("The sky is blue. \nThe sky is", ["The", " sky", " is", " blue."]) == (
        False,
        "new sentence mid-sentence",
    )
    assert judge("The sky is blue. \nThe sky is ", ["The", " sky", " is", " blue."]) == (
        False,
        "restart",
    )


def test_a_new_reply_glued_onto_a_comma_is_rejected() -> None:
    # appended turns on a real small model: "... easy-to-understand manner,Situational ..."
    assert judge(ANSWER + ",", ["Situational", " interpretation:"]) == (
        False,
        "new sentence mid-sentence",
    )


def test_a_glued_continuation_that_is_not_a_new_sentence_is_judged_as_usual() -> None:
    # Punctuation or a lower-case piece glued to the last word is a continuation; a capital
    # after a space may be a name.
    assert judge(ANSWER, [",", " which", " the", " eye", " sees", " most"]) == (True, None)
    assert judge(ANSWER + " ", ["Rayleigh", " found", " in", " 1871", " that"]) == (True, None)


def test_the_guard_accepts_a_continuation_after_four_whole_words() -> None:
    guard = ContinuationGuard(ANSWER, INSTRUCTIONS, words=4)
    assert guard.feed(" is") is None
    assert guard.feed(" scattered") is None
    assert guard.feed(" more") is None
    assert guard.feed(" than") is None  # "than" may still grow into "thank"
    assert guard.feed(" red") is True
    assert guard.held == " is scattered more than red"


def test_a_step_that_ends_at_once_is_accepted_only_if_it_ends_a_sentence() -> None:
    assert judge(ANSWER, [" most."], end=True) == (True, None)
    assert judge(ANSWER, [" most"], end=True) == (False, "ended early")
    assert judge(ANSWER, [], end=True) == (False, "ended early")


def test_estimated_tokens_err_towards_more() -> None:
    messages = [{"role": "user", "content": "x" * 4000}]
    assert estimated_tokens(messages) > 4000 / 4  # English runs at about 4 characters a token


# -- whole runs --------------------------------------------------------------------------------

TEXT = (
    "Light from the sun is scattered by the molecules of the air and blue light is scattered "
    "far more than red light because its wavelength is shorter so the sky looks blue to us "
    "during the day while sunsets look red because the light crosses more air"
)
WORDS = TEXT.split(" ")
STEP0 = tuple(f" {w}" for w in WORDS)  # one-shot answer, 45 tokens
PROPOSER = tuple(f" word{i}" + ("." if i % 6 == 5 else "") for i in range(40))


@dataclass
class StairProvider(ScriptedProvider):
    """Scripts chosen by model and, for the aggregator, by whether the request is a later step
    (it continues an answer: a final assistant message, or an assistant turn before it)."""

    later: Callable[[ChatRequest, int], Script | Exception] | None = None
    later_requests: list[ChatRequest] = field(default_factory=list)

    def stream(self, request: ChatRequest) -> ScriptedStream:
        later = any(m["role"] == "assistant" for m in request.messages)
        if request.model == "agg" and later and self.later is not None:
            self.requests.append(request)
            self.later_requests.append(request)
            outcome = self.later(request, len(self.later_requests))
            if isinstance(outcome, Exception):
                return ScriptedStream(self, Script(tokens=(), error=outcome, fail_after=0))  # type: ignore[arg-type]
            return ScriptedStream(self, outcome)
        return super().stream(request)


def proposers() -> dict[str, Script | Exception]:
    """Two proposers writing the same draft at different speeds."""
    return {
        "p1": Script(tokens=PROPOSER, ttft=0.0, interval=0.004),
        "p2": Script(tokens=PROPOSER, ttft=0.0, interval=0.006),
    }


def provider(
    later: Callable[[ChatRequest, int], Script | Exception] | None = None,
    agg: Script | None = None,
) -> StairProvider:
    """Two proposers and an aggregator whose first step writes ``agg`` (by default the
    one-shot answer ``STEP0``) and whose later steps write what ``later`` gives."""
    first = agg if agg is not None else Script(tokens=STEP0, ttft=0.0, interval=0.01)
    return StairProvider(scripts={**proposers(), "agg": first}, later=later)


def stairs(p: StairProvider, method: str = "prefill", **kw: Any) -> Any:
    kw.setdefault("steps", (4, 8))
    kw.setdefault("lead", None)
    kw.setdefault("min_news", 1)
    kw.setdefault("max_pause", 0.3)
    return moa(
        [Agent("p1", p, "p1"), Agent("p2", p, "p2")],
        Agent("agg", p, "agg"),
        policy=Partial(1, min_tokens=2),
        staircase=Staircase(default=Continuation(method, "vllm"), **kw),  # type: ignore[arg-type]
    )


async def run(spec: Any) -> tuple[str, list[Event], Any]:
    events: list[Event] = []
    async with spec.stream([{"role": "user", "content": "Why is the sky blue?"}]) as r:
        async for event in r.events():
            events.append(event)
        report = r.report
    return r.answer, events, report


def rejected(events: list[Event]) -> list[AggregatorStepRejected]:
    return [e for e in events if isinstance(e, AggregatorStepRejected)]


async def test_restarting_steps_are_rejected_and_the_first_answer_goes_on_whole() -> None:
    restart = Script(tokens=(" \nLight", " from", " the", " sun", " is"), interval=0.001)
    p = provider(lambda request, n: restart)
    answer, events, report = await run(stairs(p))
    assert answer == "".join(STEP0)  # word for word the first step's answer
    reasons = [e.reason for e in rejected(events)]
    assert reasons == ["new line mid-sentence"] * 2  # max_rejects, then no more steps
    assert len(p.later_requests) == 2
    assert p.open_streams == 0
    steps = [a for a in report.agents if a.role == "aggregator"]
    assert [a.error for a in steps[1:]] == ["rejected: new line mid-sentence"] * 2


async def test_a_good_step_takes_over_after_the_cut() -> None:
    def later(request: ChatRequest, n: int) -> Script:
        return Script(tokens=(" which", " is", " why", " it", " is", " blue."), interval=0.001)

    p = provider(later)
    answer, events, report = await run(stairs(p, max_steps=1))
    assert not rejected(events)
    assert len(p.later_requests) == 1
    prefill = p.later_requests[0].messages[-1]
    assert prefill["role"] == "assistant"
    # the caller got the first step up to the cut, then the second step, nothing twice
    assert answer == prefill["content"] + " which is why it is blue."
    assert answer.startswith("".join(STEP0[:4]).lstrip()) or answer.startswith(" Light")
    assert p.open_streams == 0
    statuses = [a.status for a in report.agents if a.role == "aggregator"]
    assert statuses == ["cancelled", "complete"]


async def test_a_slow_step_is_rejected_within_the_pause_and_the_stream_goes_on() -> None:
    slow = Script(tokens=(" which", " is", " why", " it", " is"), ttft=5.0)
    p = provider(lambda request, n: slow)
    answer, events, _ = await run(stairs(p, max_pause=0.2))
    assert answer == "".join(STEP0)
    # A server that could not get a step ready in time is not asked again in this run ...
    assert [e.reason for e in rejected(events)] == ["not ready in time"]
    # no gap between two answer deltas much longer than the pause (generous margin)
    times = [e.t for e in events if e.type == "aggregator.delta"]
    assert max(b - a for a, b in itertools.pairwise(times)) < 0.2 + 1.0
    assert p.open_streams == 0
    # ... and after a second late step in a row, not in the next run either (back-off: 1
    # run, then 2, 4 ... up to 16 while steps stay late)
    await run(stairs(p, max_pause=0.2))
    assert len(p.later_requests) == 2
    answer, events, _ = await run(stairs(p, max_pause=0.2))
    assert len(p.later_requests) == 2 and answer == "".join(STEP0)
    await run(stairs(p, max_pause=0.2))
    assert len(p.later_requests) == 3


async def test_markup_copied_by_a_step_never_reaches_the_caller() -> None:
    copy = Script(tokens=(" </draft>", "\n\n", "<draft", ' n="1"'), interval=0.001)
    p = provider(lambda request, n: copy)
    answer, events, _ = await run(stairs(p))
    assert "draft" not in answer and answer == "".join(STEP0)
    assert {e.reason for e in rejected(events)} == {"markup"}


async def test_a_refused_prefill_moves_the_aggregator_to_appended_turns_once() -> None:
    refusal = RequestRejectedError(
        "This model does not support assistant message prefill. The conversation must end "
        "with a user message.",
        status=400,
    )

    def later(request: ChatRequest, n: int) -> Script | Exception:
        if request.messages[-1]["role"] == "assistant":
            return refusal
        return Script(tokens=(" which", " is", " why", " it", " is", " blue."), interval=0.001)

    p = provider(later)
    with structlog.testing.capture_logs() as logs:
        answer, _, _ = await run(stairs(p, max_steps=2))
        # the provider object remembers it: a second run asks by turns at once
        answer2, events2, _ = await run(stairs(p, max_steps=2))
    assert [m["role"] for m in p.later_requests[0].messages][-1] == "assistant"
    assert all(r.messages[-1]["role"] == "user" for r in p.later_requests[1:])
    warnings = [e for e in logs if e["event"] == "staircase.prefill_refused"]
    assert len(warnings) == 1 and warnings[0]["log_level"] == "warning"
    assert answer.endswith(" which is why it is blue.")
    assert answer2.endswith(" which is why it is blue.")
    steps2 = [e for e in events2 if isinstance(e, AggregatorStep) and e.step > 0]
    assert steps2 and all(e.continuation == "turns" for e in steps2)
    assert p.open_streams == 0


async def test_no_step_is_sent_that_would_not_fit_the_context_window() -> None:
    good = Script(tokens=(" which", " is", " why", " it", " is"), interval=0.001)
    p = provider(lambda request, n: good)
    # The first request is about 250 estimated tokens: with 256 kept for the rest of the
    # answer, no later step fits in 400.
    answer, events, _ = await run(stairs(p, context_window=400))
    assert p.later_requests == []
    assert answer == "".join(STEP0)
    assert not [e for e in events if isinstance(e, AggregatorStep) and e.step > 0]


async def test_steps_stop_at_max_steps() -> None:
    """One later step allowed: it is kept for the references' end (they end long before the
    first step's answer), and no other step is asked."""
    good = Script(tokens=(" and", " so", " on", " and", " so", " on"), interval=0.001)
    p = provider(lambda request, n: good)
    _, events, _ = await run(stairs(p, max_steps=1, max_pause=1.0))
    assert len(p.later_requests) == 1
    (step,) = [e for e in events if isinstance(e, AggregatorStep) and e.step > 0]
    assert step.final


async def test_the_answer_keeps_no_pace_once_no_step_will_read_the_references() -> None:
    """Pacing exists so that later steps see more: with no step to come (here ``max_steps=0``)
    the answer runs at its own speed instead of waiting for proposers it will never read."""
    slow = Script(tokens=PROPOSER, ttft=0.0, interval=0.05)  # 40 chunks: 2 s
    for max_steps, paced in ((0, False), (None, True)):
        p = provider(lambda request, n: Script(tokens=(" and", " so", " on"), interval=0.001))
        p.scripts["p1"] = p.scripts["p2"] = slow
        # min_news out of reach (a step is asked only as a reference first shows text, and
        # rejected: it ends at once) and rejections unlimited: stepping stays on
        spec = stairs(
            p, lead=2, max_steps=max_steps, max_pause=5.0, min_news=10**6, max_rejects=10**3
        )
        _, events, _ = await run(spec)
        (done,) = [e for e in events if isinstance(e, AggregatorDone)]
        # one-shot, the 45-chunk answer takes about 0.45 s; kept to half the proposers' pace
        # beyond its lead it ends after them (2 s)
        assert (done.t > 1.8) is paced, (max_steps, done.t)


async def test_the_whole_layout_starts_on_whole_sentences() -> None:
    p = provider(lambda request, n: Script(tokens=(" and", " so", " on"), interval=0.001))
    answer, _, _ = await run(stairs(p, layout="whole", max_steps=0, max_pause=2.0))
    first = next(r for r in p.requests if r.model == "agg")
    prompt = first.messages[-1]["content"]
    assert '<draft n="1">\n word0 word1 word2 word3 word4 word5.' in prompt
    assert "status=" not in prompt and "partial" not in prompt
    for draft in prompt.split('<draft n="')[2:]:  # the first split is the header's mention
        assert draft.split("\n</draft>")[0].endswith(".")  # a whole sentence, never cut mid-way
    assert answer == "".join(STEP0)


# -- an answer that repeats itself ---------------------------------------------------------------


def chunked(text: str, cuts: list[int]) -> list[str]:
    """``text`` cut at ``cuts`` (offsets; 0 and repeats ignored) into the chunks a stream
    could deliver it in."""
    bounds = [0, *sorted({c for c in cuts if 0 < c < len(text)}), len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


def gate_run(
    text: str, chunks: list[str] | None = None, prompt: tuple[str, ...] = ()
) -> tuple[str, RepetitionGate]:
    gate = RepetitionGate(prompt=prompt)
    out: list[str] = []
    for piece in chunks if chunks is not None else re.findall(r"\s*\S+|\s+", text):
        passed = gate.feed(piece, "".join(out)[-1:], lambda: "".join(out))
        out.append(passed)
        if gate.looping:
            return "".join(out), gate
    out.append(gate.flush(lambda: "".join(out)))
    return "".join(out), gate


LOOP = "Deeper than a lifetime in the ocean.\n\n" * 6


@given(st.lists(st.integers(1, len(LOOP) - 1), max_size=12))
def test_a_looping_answer_ends_before_its_second_restart(cuts: list[int]) -> None:
    chunks = chunked(LOOP, cuts)
    text, gate = gate_run(LOOP, chunks)
    assert gate.looping and gate.restarts == 2
    # however it was chunked (the line breaks before the dropped sentence may go with it)
    assert text.rstrip() == ("Deeper than a lifetime in the ocean.\n\n" * 2).rstrip()


@given(st.lists(st.integers(1, len(TEXT) - 1), max_size=12))
def test_an_answer_that_does_not_repeat_passes_whole(cuts: list[int]) -> None:
    answer = "The sky is blue. Light scatters! Yes.\nThe air scatters blue light more. Done"
    chunks = chunked(answer, [c % len(answer) for c in cuts])
    text, gate = gate_run(answer, chunks)
    assert text == answer and not gate.looping and gate.restarts == 0


def test_one_restart_passes_and_is_counted() -> None:
    answer = "The sky is blue by day. At dusk it reddens. The sky is blue because of air."
    text, gate = gate_run(answer)
    assert text == answer and gate.restarts == 1 and not gate.looping


# The update header and the continue request copied into an answer (SmolLM2-135M, appended
# turns): dropped sentence by sentence, the answer goes on.
PARROTING = (
    "The sky is blue because air scatters light. The notes went on. What they added since, "
    "quoted the same way:\nBlue light scatters more than red light. Continue your answer from "
    "exactly where it stopped, taking this into account. That is why."
)


@given(st.lists(st.integers(1, len(PARROTING) - 1), max_size=12))
def test_the_prompts_sentences_are_dropped_from_an_answer(cuts: list[int]) -> None:
    chunks = chunked(PARROTING, cuts)
    out, gate = gate_run(PARROTING, chunks, prompt=INSTRUCTIONS)
    assert " ".join(out.split()) == (
        "The sky is blue because air scatters light. Blue light scatters more than red light. "
        "That is why."
    )
    assert gate.parroted == 3 and not gate.looping


# SmolLM2-135M, by prefill, on a status note it was given ("A note marked partial is
# unfinished: it may stop mid-sentence ..."): the note in other words, as a list item and as
# the whole answer.
PARAPHRASED = (
    "Drink water.\nA note marked incomplete: it may have finished but not produced its final "
    "output.\nA note marked failing produced nothing, it may stop in mid-sentence.\nSleep well."
)


@given(st.lists(st.integers(1, len(PARAPHRASED) - 1), max_size=12))
def test_the_prompts_sentences_in_other_words_are_dropped(cuts: list[int]) -> None:
    prompt = (*INSTRUCTIONS, T.status_note)
    out, gate = gate_run(PARAPHRASED, chunked(PARAPHRASED, cuts), prompt=prompt)
    assert out.split() == ["Drink", "water.", "Sleep", "well."]
    assert gate.parroted == 2 and not gate.looping


def test_a_sentence_that_only_begins_like_the_prompts_goes_on() -> None:
    answer = "Light scatters. The notes of a song differ. Continue reading for more."
    out, gate = gate_run(answer, prompt=INSTRUCTIONS)
    assert out == answer and gate.parroted == 0


# SmolLM2-135M, appended turns: one sentence that never ends, to the token limit.
ENDLESS = "The SkyBlue - A question that \nThe sky is a result of the blue sky" + (
    " that is a result of the sky" * 40
)


@given(st.lists(st.integers(1, len(ENDLESS) - 1), max_size=12))
def test_a_sentence_that_loops_within_itself_ends_the_answer(cuts: list[int]) -> None:
    text, gate = gate_run(ENDLESS, chunked(ENDLESS, cuts))
    assert gate.looping and gate.repeats == 1 and ENDLESS.startswith(text)


def test_a_sentence_that_loops_within_itself_ends_soon() -> None:
    text, gate = gate_run(ENDLESS)  # a word at a time, as a stream of tokens comes
    assert gate.looping
    # within a check or two of the loop's start, not at the end of the stream
    assert len(text) < 2 * LONG_SENTENCE + 100 < len(ENDLESS)


def test_a_long_sentence_that_goes_somewhere_passes() -> None:
    long = (
        "Light from the sun, which looks white but holds every colour, meets the molecules of "
        "nitrogen and oxygen in the air, and because those molecules are far smaller than its "
        "wavelengths they scatter the short blue waves many times more than the long red ones, "
        "so that blue reaches the eye from every part of the sky."
    )
    text, gate = gate_run(long)
    assert text == long and not gate.looping


# SmolLM2-135M, appended turns: a line of one word, again and again.
SHORT_LOOP = "The sky is blue, a \n" + "A \n" * 20


@given(st.lists(st.integers(1, len(SHORT_LOOP) - 1), max_size=12))
def test_a_loop_of_short_lines_ends_at_its_second_repeat(cuts: list[int]) -> None:
    text, gate = gate_run(SHORT_LOOP, chunked(SHORT_LOOP, cuts))
    assert gate.looping and gate.restarts == 2
    assert text.split() == ["The", "sky", "is", "blue,", "a", "A", "A"]


def test_short_sentences_that_differ_pass() -> None:
    answer = "Yes.\nIt is.\nNo.\nIt is not.\nMaybe so."
    text, gate = gate_run(answer)
    assert text == answer and gate.restarts == 0 and not gate.looping


# A list whose items open differently and go on alike (SmolLM2-135M, shortened).
LIST_ITEM = "The {} tip is to stay away from the temptation of a glass of water before bed. "
LIST_LOOP = "Some tips follow. " + "".join(
    LIST_ITEM.format(n) for n in ("fifth", "sixth", "seventh", "eighth")
)


@given(st.lists(st.integers(1, len(LIST_LOOP) - 1), max_size=12))
def test_a_list_that_loops_ends_after_its_second_repeated_item_in_a_row(cuts: list[int]) -> None:
    chunks = chunked(LIST_LOOP, cuts)
    text, gate = gate_run(LIST_LOOP, chunks)
    assert gate.looping and gate.repeats == 2 and gate.restarts == 0
    # A repeat shows at the sentence's end: the second in a row has reached the caller when it
    # is seen, and the answer ends after it.
    items = ("fifth", "sixth", "seventh")
    expected = "Some tips follow. " + "".join(LIST_ITEM.format(n) for n in items)
    assert text.rstrip() == expected.rstrip()


def test_after_a_repeat_sentences_that_do_not_repeat_pass() -> None:
    answer = (
        LIST_ITEM.format("first")
        + LIST_ITEM.format("second")
        + "Water at night wakes you up. Sleep in a cool and dark room instead."
    )
    text, gate = gate_run(answer)
    assert text == answer and gate.repeats == 1 and not gate.looping


def test_list_items_that_share_a_few_words_do_not_repeat() -> None:
    answer = (
        "The first tip is to drink water in the morning. The second tip is to walk for half an "
        "hour every day. The third tip is to sleep for at least seven hours a night."
    )
    text, gate = gate_run(answer)
    assert text == answer and gate.repeats == 0 and not gate.looping


# A one-shot answer of SmolLM2-135M's (shortened): it restarts now and then, never twice in a row.
SPREAD = (
    "The sky is blue because air scatters light. Blue light has a short wavelength. The sky is "
    "blue at noon and red at dusk. Red light travels farther through the air. The sky is blue "
    "for that reason."
)


@given(st.lists(st.integers(1, len(SPREAD) - 1), max_size=12))
def test_restarts_that_do_not_follow_each_other_pass(cuts: list[int]) -> None:
    text, gate = gate_run(SPREAD, chunked(SPREAD, cuts))
    assert text == SPREAD and gate.restarts == 2 and not gate.looping


async def test_a_step_that_loops_ends_the_answer_and_later_runs_start_late() -> None:
    first = tuple(re.findall(r"\s*\S+", "Deeper than a lifetime in the ocean. " + TEXT))
    loop = " and the fish glow in the dark." + " Deeper than a lifetime in the ocean." * 4
    loop += " " + TEXT

    def later(request: ChatRequest, n: int) -> Script:
        return Script(tokens=tuple(re.findall(r"\s*\S+", loop)), interval=0.001)

    p = provider(later)
    p.scripts["agg"] = Script(tokens=first, ttft=0.0, interval=0.01)
    spec = stairs(p, steps=(10,), max_steps=1)
    answer, events, _ = await run(spec)
    # the step goes on after the cut, restarts once (passed on), then again: the answer ends
    # before that second restart in a row
    ending = "the fish glow in the dark. Deeper than a lifetime in the ocean."
    assert answer.rstrip().endswith(ending)
    assert answer.count("Deeper than a lifetime") == 2
    (done,) = [e for e in events if isinstance(e, AggregatorDone)]
    assert done.finish_reason == "stop"
    # the next run of the same aggregator waits for every draft to end before it starts
    await run(spec)
    second = [r for r in p.requests if r.model == "agg" and r not in p.later_requests][-1]
    prompt = second.messages[-1]["content"]
    assert prompt.count('status="complete"') == 2 and 'status="partial' not in prompt
    assert "word39" in prompt  # both drafts whole


async def test_chunks_held_at_sentence_starts_still_count_against_max_tokens() -> None:
    """The repetition gate holds the first words of each sentence and passes them on together;
    they are still counted one by one, so a later step asks only for what is left."""
    sentences = tuple(
        f" {w}" + ("." if i % 10 == 9 else "") for i, w in enumerate(f"w{i}" for i in range(40))
    )
    good = Script(tokens=(" and", " so", " on."), interval=0.001)
    p = provider(lambda request, n: good, Script(tokens=sentences, ttft=0.0, interval=0.01))
    spec = moa(
        [Agent("p1", p, "p1"), Agent("p2", p, "p2")],
        Agent("agg", p, "agg", max_tokens=100),
        policy=Partial(1, min_tokens=2),
        staircase=Staircase(
            default=Continuation("prefill", "vllm"), steps=(12,), lead=None, min_news=1
        ),
    )
    _, events, _ = await run(spec)
    steps = [e for e in events if isinstance(e, AggregatorStep) and e.step > 0]
    assert steps and p.later_requests
    before = steps[0].answer_chars
    written = len("".join(sentences)[:before].split())  # one chunk a word
    assert p.later_requests[0].max_tokens == 100 - written


def test_the_gate_can_be_turned_off() -> None:
    gate = RepetitionGate(limit=0)
    assert gate.feed(LOOP, "", lambda: "") == LOOP and not gate.looping
    with pytest.raises(ConfigError, match="loop_restarts"):
        Staircase(loop_restarts=-1)


# -- the read-ahead ------------------------------------------------------------------------------

CONTINUE = (" which", " is", " why", " it", " is", " blue.")


def slow_steps(ttft: float) -> StairProvider:
    """Every request of the aggregator, the first included, takes ``ttft`` to its first token;
    the first step writes fast and later steps continue the answer correctly."""
    p = provider(lambda request, n: Script(tokens=CONTINUE, ttft=ttft, interval=0.001))
    p.scripts["agg"] = Script(tokens=STEP0, ttft=ttft, interval=0.005)
    return p


def longest_gap(events: list[Event]) -> float:
    times = [e.t for e in events if e.type == "aggregator.delta"]
    return max(b - a for a, b in itertools.pairwise(times))


async def test_the_read_ahead_hides_a_later_steps_time_to_first_token() -> None:
    """Without a read-ahead the caller waits out each later step's first token; with one, the
    answer the first step wrote ahead is spaced out over that time, and the later step goes on
    after it: one answer, nothing lost or given twice."""
    ttft = 0.8
    p = slow_steps(ttft)
    _, events, _ = await run(stairs(p, steps=(8, 16), max_steps=1, max_pause=2.0, read_ahead=0))
    assert len(p.later_requests) == 1 and not rejected(events)
    assert longest_gap(events) >= ttft - 0.05

    p = slow_steps(ttft)
    answer, events, _ = await run(stairs(p, steps=(8, 16), max_steps=1, max_pause=2.0))
    assert len(p.later_requests) == 1 and not rejected(events)
    prefill = p.later_requests[0].messages[-1]
    assert answer == prefill["content"] + "".join(CONTINUE)
    # the step was asked with text the caller had not been given yet
    (step,) = [e for e in events if isinstance(e, AggregatorStep) and e.step == 1]
    given = sum(len(e.text) for e in events if e.type == "aggregator.delta" and e.t < step.t)
    assert given < step.answer_chars
    assert longest_gap(events) < ttft / 2  # generous: about ttft / 8 when nothing is late
    assert p.open_streams == 0


async def test_leaving_while_a_step_is_tried_closes_every_stream() -> None:
    p = slow_steps(0.5)
    spec = stairs(p, steps=(8, 16), max_steps=1, max_pause=2.0)
    stepped = False
    async with spec.stream([{"role": "user", "content": "Why is the sky blue?"}]) as r:
        async for event in r.events():
            stepped = stepped or (isinstance(event, AggregatorStep) and event.step == 1)
            if stepped and event.type == "aggregator.delta":
                break  # given from the read-ahead while the step gets ready
    assert stepped and len(p.later_requests) == 1
    assert p.open_streams == 0


async def test_the_read_ahead_goes_on_while_the_stream_stalls() -> None:
    """A stream that stops for a second mid-answer: what was read ahead still reaches the
    caller in its turn meanwhile; without a read-ahead the caller waits the second out."""

    def stalling(read_ahead: int) -> Any:
        p = provider(lambda request, n: Script(tokens=CONTINUE, interval=0.001))
        # proposers far slower than the answer: the one later step allowed is kept for their
        # end, which comes after the answer's, so the first step writes it all
        p.scripts["p1"] = p.scripts["p2"] = Script(tokens=PROPOSER, interval=0.1)
        p.scripts["agg"] = Script(tokens=STEP0, ttft=0.5, interval=0.005, stall_at=20, stall=1.0)
        return p, stairs(p, max_steps=1, max_pause=1.0, read_ahead=read_ahead)

    p, spec = stalling(0)
    answer, events, _ = await run(spec)
    assert answer == "".join(STEP0) and longest_gap(events) >= 0.9

    p, spec = stalling(32)
    answer, events, _ = await run(spec)
    assert answer == "".join(STEP0)
    assert longest_gap(events) < 0.6  # the read-ahead spaced out at most max_pause / 2 apart
    assert p.open_streams == 0


async def test_a_step_that_fails_while_read_ahead_is_spaced_out_gives_what_was_read() -> None:
    p = provider(lambda request, n: Script(tokens=CONTINUE, interval=0.001))
    p.scripts["p1"] = p.scripts["p2"] = Script(tokens=PROPOSER, interval=0.1)
    error = ServerError("upstream went away", status=502)
    p.scripts["agg"] = Script(tokens=STEP0, ttft=0.5, interval=0.005, error=error, fail_after=30)
    spec = stairs(p, max_steps=1, max_pause=1.0)
    with pytest.raises(AggregatorError) as caught:
        await run(spec)
    assert caught.value.partial_text == "".join(STEP0[:30])
    assert p.open_streams == 0


def test_the_read_ahead_is_a_whole_number() -> None:
    with pytest.raises(ConfigError, match="read_ahead"):
        Staircase(read_ahead=-1)


def partial_prompts(p: StairProvider) -> list[bool]:
    """Whether each first request of the aggregator quoted a draft still being written."""
    firsts = [r for r in p.requests if r.model == "agg" and r not in p.later_requests]
    return ['status="partial' in r.messages[-1]["content"] for r in firsts]


async def test_a_loop_makes_only_the_next_run_start_late() -> None:
    p = provider(agg=Script(tokens=tuple(re.findall(r"\s*\S+|\s+", LOOP)), interval=0.001))
    spec = stairs(p, max_steps=0)
    for _ in range(3):
        await run(spec)
    # run 1 started early and looped: run 2 starts on finished drafts; it looped too but did
    # not start early, which counts neither way, and run 3 tries the early start again
    assert partial_prompts(p) == [True, False, True]


async def test_an_answer_that_goes_on_past_a_dropped_prompt_sentence_keeps_the_early_start() -> (
    None
):
    from moa_stream.engine.prompts import DEFAULT_STATUS_NOTE

    parroting = DEFAULT_STATUS_NOTE + " The sky is blue because air scatters light."
    p = provider(agg=Script(tokens=tuple(re.findall(r"\s*\S+", parroting)), interval=0.001))
    spec = stairs(p, max_steps=0)
    answers = [(await run(spec))[0] for _ in range(2)]
    # the prompt's sentences never reach the caller, the first one included; what is left is
    # a whole answer, so the early start stands
    assert [a.strip() for a in answers] == ["The sky is blue because air scatters light."] * 2
    assert partial_prompts(p) == [True, True]


async def test_the_first_request_waits_for_a_draft_it_can_quote() -> None:
    # the policy fires on two tokens of a draft, too few to quote whole words of: the first
    # request waits (up to max_pause) for a quote rather than introducing notes it has not got
    p = provider(lambda request, n: Script(tokens=CONTINUE, interval=0.001))
    await run(stairs(p, max_steps=0))
    first = next(r for r in p.requests if r.model == "agg")
    prompt = first.messages[-1]["content"]
    assert '<draft n="1" status="partial' in prompt and "word0" in prompt


async def test_an_early_answer_that_was_all_prompt_text_starts_again_on_finished_drafts() -> None:
    from moa_stream.engine.prompts import DEFAULT_STATUS_NOTE

    @dataclass
    class Parrot(StairProvider):
        asked: int = 0

        def stream(self, request: ChatRequest) -> ScriptedStream:
            if request.model == "agg":
                self.asked += 1
                text = DEFAULT_STATUS_NOTE if self.asked == 1 else "Air scatters blue light."
                self.scripts["agg"] = Script(tokens=tuple(re.findall(r"\s*\S+", text)))
            return super().stream(request)

    p = Parrot(scripts=proposers())
    answer, events, report = await run(stairs(p, max_steps=0))
    # nothing of the first answer reached the caller: the second, asked once both drafts had
    # ended, is the answer
    assert answer.strip() == "Air scatters blue light."
    prompts = [r.messages[-1]["content"] for r in p.requests if r.model == "agg"]
    assert len(prompts) == 2 and 'status="partial' in prompts[0]
    assert prompts[1].count('status="complete"') == 2
    assert [e.type for e in events].count("aggregator.done") == 1
    assert p.open_streams == 0
    steps = [a for a in report.agents if a.role == "aggregator"]
    assert [a.status for a in steps] == ["complete", "complete"]
