"""Staircase steps, the pure part: joins, what references hand over, each step's request."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from moa_stream._exceptions import ConfigError
from moa_stream._types import ChatMessage
from moa_stream.engine.prompts import PromptTemplates, whole_layout
from moa_stream.engine.staircase import (
    Continuation,
    Joiner,
    ReferenceTracker,
    Staircase,
    StepPrompts,
    parse_continuation,
    parse_steps,
    stable_length,
    step_sizes,
)

CONVERSATION: list[ChatMessage] = [{"role": "user", "content": "Why is the sea salty?"}]


def render(messages: Sequence[ChatMessage]) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


class Ref:
    """A proposer's progress as the run holds it."""

    def __init__(self, index: int, text: str, state: str = "running") -> None:
        self.index, self.text, self.state = index, text, state

    def grow(self, more: str) -> None:
        self.text += more


def view(refs: Sequence[Ref]) -> list[tuple[int, str, str, str]]:
    return [(r.index, f"p{r.index}", r.state, r.text) for r in refs]


# -- joins -----------------------------------------------------------------------------------

words = st.lists(st.text(alphabet="abcdefghij.,", min_size=1, max_size=8), min_size=1, max_size=40)
separators = st.sampled_from([" ", " ", " ", "\n", "\n\n"])


@st.composite
def answers(draw: st.DrawFn) -> str:
    ws = draw(words)
    out = ws[0]
    for w in ws[1:]:
        out += draw(separators) + w
    return out


def chop(draw: st.DrawFn, text: str) -> list[str]:
    """``text`` cut into deltas at arbitrary points."""
    if not text:
        return []
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(text) - 1)), max_size=6))))
    bounds = [0, *[c for c in cuts if 0 < c < len(text)], len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


@given(data=st.data(), answer=answers(), server=st.sampled_from(["vllm", "llama", "turns"]))
def test_any_split_of_an_answer_into_steps_reassembles_exactly(
    data: st.DataObject, answer: str, server: str
) -> None:
    """Whatever the step boundaries (mid-word included) and however the server splits its
    deltas, echoes the prefill (llama-server) or re-sends a trailing space, the caller gets
    the answer once: no character repeated or lost."""
    cuts = sorted(set(data.draw(st.lists(st.integers(1, len(answer)), max_size=6))))
    bounds = [0, *[c for c in cuts if c < len(answer)], len(answer)]
    joiner = Joiner()
    out = ""
    for a, b in itertools.pairwise(bounds):
        if server == "turns":
            prefill = None
            sent = answer[a:b]  # the model continues right after its previous turn
        else:
            prefill = out.rstrip()
            start = len(prefill)
            sent = answer[start:b]  # the server continues the prefill, trailing space included
            if server == "llama" and prefill:
                sent = prefill + sent  # ... and repeats the prefill first
        joiner.begin(out, prefill, echoes=server == "llama")
        for delta in chop(data.draw, sent):
            out += joiner.feed(delta)
        out += joiner.flush()
        assert out == answer[:b]
    assert out == answer


def test_a_step_that_begins_mid_word_is_appended_as_it_is() -> None:
    joiner = Joiner()
    joiner.begin("The sea is va", None)
    assert joiner.feed("st and") == "st and"


def test_an_echoed_prefill_split_over_deltas_is_stripped() -> None:
    joiner = Joiner()
    joiner.begin("The sea is vast and ", "The sea is vast and", echoes=True)
    assert joiner.feed("The sea is") == ""
    assert joiner.feed(" vast and endless") == "endless"
    assert joiner.feed(" blue") == " blue"


def test_text_that_only_looks_like_the_start_of_the_prefill_is_kept() -> None:
    joiner = Joiner()
    joiner.begin("The sea", "The sea", echoes=True)
    assert joiner.feed("The") == ""
    assert joiner.feed("n it") == "Then it"


def test_duplicated_whitespace_at_a_join_is_dropped() -> None:
    joiner = Joiner()
    joiner.begin("vast and ", None)  # appended turns: a space is not doubled
    assert joiner.feed(" endless") == "endless"
    joiner.begin("end.\n\n", "end.")  # a prefill without the trailing whitespace
    assert joiner.feed("\n") == ""
    assert joiner.feed("\nNext") == "Next"


# -- schedule and config ---------------------------------------------------------------------


def test_step_schedule_repeats_its_last_size() -> None:
    sizes = step_sizes(parse_steps("8, 16 32"))
    assert [next(sizes) for _ in range(5)] == [8, 16, 32, 32, 32]
    for bad in ("", "8, x", "0", "-4"):
        with pytest.raises(ValueError, match="step"):
            parse_steps(bad)


def test_staircase_rejects_bad_arguments_with_config_error() -> None:
    bad: list[Callable[[], Staircase]] = [
        lambda: Staircase(steps=()),
        lambda: Staircase(steps=(8, 0)),
        lambda: Staircase(lead=-1),
        lambda: Staircase(give_up_after=-0.5),
    ]
    for make in bad:
        with pytest.raises(ConfigError, match="Staircase"):
            make()


def test_continuation_names() -> None:
    assert parse_continuation("turns") == Continuation("turns")
    assert parse_continuation("prefill") == Continuation("prefill", "vllm")
    assert str(parse_continuation("prefill:llama")) == "prefill:llama"
    with pytest.raises(ValueError, match="flavour"):
        parse_continuation("prefill:gpt")
    with pytest.raises(ConfigError):
        Continuation("telepathy")  # type: ignore[arg-type]


# -- references across steps -----------------------------------------------------------------


def test_a_partial_reference_is_handed_over_at_sentence_ends_and_never_mid_word() -> None:
    assert stable_length("One two. Three fo", False) == len("One two. ")
    long_line = "a" * 10 + " bbbbbbbbbb cccccccccc dddd"
    assert stable_length(long_line, False) == long_line.rindex(" ") + 1
    # a short unfinished line waits for its end: the answer line is never split
    text = "It is so.\nAnswer: "
    assert stable_length(text, False) == len("It is so.\n")
    assert stable_length(text + "42", True) == len(text) + 2


def test_the_tracker_reports_only_what_is_new() -> None:
    tracker = ReferenceTracker(PromptTemplates(), None)
    refs = [Ref(0, "First sentence. Sec"), Ref(1, "")]
    block = tracker.first(view(refs))
    assert "First sentence." in block and "Sec" not in block
    assert 'n="2"' not in block  # no text yet: not shown
    assert not tracker.has_news(view(refs))
    assert tracker.gains(view(refs)) == []  # nothing new: no step needed
    refs[0].grow("ond one. And")
    assert tracker.has_news(view(refs))
    refs[1].grow("Other view. ")
    parts = tracker.gains(view(refs))
    assert not tracker.has_news(view(refs))
    assert len(parts) == 2
    assert "continued" in parts[0] and "ond one. " in parts[0] and "First" not in parts[0]
    assert parts[1].startswith('<draft n="2" status="partial')
    refs[0].state = "complete"
    (done,) = tracker.gains(view(refs))
    assert 'status="complete" continued' in done and "And" in done
    assert not tracker.settled(view(refs))
    refs[1].state = "failed"
    (failed,) = tracker.gains(view(refs))
    assert "failed" in failed
    assert tracker.settled(view(refs))
    assert tracker.gains(view(refs)) == []
    infos = tracker.infos(view(refs))
    assert [(i.agent, i.status) for i in infos] == [("p0", "complete"), ("p1", "failed")]


def test_given_up_references_are_marked_once() -> None:
    tracker = ReferenceTracker(PromptTemplates(), None)
    refs = [Ref(0, "Half of it. ")]
    tracker.first(view(refs))
    (part,) = tracker.gains(view(refs), given_up=True)
    assert "given up on" in part
    assert tracker.gains(view(refs), given_up=True) == []


# -- each step only appends to the previous request ------------------------------------------


@pytest.mark.parametrize("method", ["turns", "prefill:vllm", "prefill:prefix", "prefill:llama"])
def test_each_step_extends_the_previous_request(method: str) -> None:
    continuation = parse_continuation(method)
    tracker = ReferenceTracker(PromptTemplates(), None)
    prompts = StepPrompts(CONVERSATION, continuation, PromptTemplates())
    refs = [Ref(0, "Rivers carry salt. "), Ref(1, "Rock weathers. ")]
    first = prompts.first(tracker.first(view(refs)))
    assert render(first).startswith(render(CONVERSATION).removesuffix("<|im_end|>\n"))
    answer = ""
    previous = render(first)
    for step_text, more in [("The sea ", "Then vents. "), ("is salty because ", "More. ")]:
        answer += step_text
        refs[0].grow(more)
        messages, extra = prompts.next(tracker.gains(view(refs)), step_text, answer)
        rendered = render(messages)
        if continuation.method == "turns":
            assert rendered.startswith(previous)
            assert messages[-2] == {"role": "assistant", "content": step_text}
            assert extra == {}
        else:
            # the answer so far is the last message: everything before it extends the previous
            # request without its own prefill
            head = render(messages[:-1]).removesuffix("<|im_end|>\n")
            assert head.startswith(
                previous.split("<|im_start|>assistant")[0].removesuffix("<|im_end|>\n")
            )
            assert messages[-1]["role"] == "assistant"
            assert messages[-1]["content"] == answer.rstrip()
            if method == "prefill:vllm":
                assert extra == {"continue_final_message": True, "add_generation_prompt": False}
            if method == "prefill:prefix":
                assert messages[-1].get("prefix") is True
        previous = rendered


@given(st.text(alphabet="ab .!?;\n", max_size=3000))
def test_the_backward_search_finds_the_last_sentence_end(text: str) -> None:
    import re

    naive = 0
    for match in re.finditer(r"[.!?;]\s|\n", text):
        naive = match.end()
    from moa_stream.engine.staircase import _last_sentence_end

    assert _last_sentence_end(text) == naive


# -- the whole layout: drafts re-rendered in place, no labels ---------------------------------


def test_the_whole_layout_quotes_whole_sentences_without_labels() -> None:
    templates = whole_layout(PromptTemplates())
    tracker = ReferenceTracker(templates, None, whole_sentences=True)
    refs = [Ref(0, "Rivers carry salt to the sea, and it stays"), Ref(1, "")]
    # no sentence finished yet: nothing to quote, the first request is the conversation
    assert tracker.block(view(refs)) == ""
    refs[0].grow(" there. Rain dissol")
    block = tracker.block(view(refs))
    assert "it stays there.\n</draft>" in block and "Rain" not in block
    for label in ("status=", "partial", "still being written", 'complete"'):
        assert label not in block
    refs[1].grow("Vents add minerals. ")
    refs[1].state = "complete"
    refs[0].state = "failed"
    block = tracker.block(view(refs))
    # a failed reference keeps what was quoted of it, in its place; no status anywhere
    assert block.index('<draft n="1">') < block.index('<draft n="2">')
    assert "it stays there." in block and "Rain" not in block and "failed" not in block
    assert tracker.settled(view(refs))


@pytest.mark.parametrize("method", ["turns", "prefill:llama"])
def test_a_whole_layout_step_is_the_first_request_refreshed_then_the_answer(method: str) -> None:
    continuation = parse_continuation(method)
    templates = whole_layout(PromptTemplates())
    tracker = ReferenceTracker(templates, None, whole_sentences=True)
    prompts = StepPrompts(CONVERSATION, continuation, templates)
    refs = [Ref(0, "Rivers carry salt. ")]
    first = prompts.first(tracker.block(view(refs)))
    refs[0].grow("Vents add more. ")
    messages, extra = prompts.refresh(tracker.block(view(refs)), "The sea is salty because ")
    prompts.commit()
    assert len(first) == 1 and first[0]["content"].startswith(CONVERSATION[0]["content"])
    assert "Vents add more." in messages[0]["content"]  # the same message, refreshed
    assert "Vents" not in first[0]["content"]
    if continuation.method == "turns":
        assert messages[1] == {"role": "assistant", "content": "The sea is salty because"}
        assert messages[2] == {"role": "user", "content": templates.continue_instruction}
    else:
        assert messages[1:] == [{"role": "assistant", "content": "The sea is salty because"}]
    assert extra == {}
    # custom templates are kept as they are
    custom = PromptTemplates(draft="[{number}] {text}")
    assert whole_layout(custom).draft == "[{number}] {text}"


def test_the_layout_is_checked() -> None:
    with pytest.raises(ConfigError, match="layout"):
        Staircase(layout="scroll")  # type: ignore[arg-type]


def test_a_failed_reference_is_quoted_without_its_text() -> None:
    # as a layer hands it over: the label says it gave no answer, so none of its words follow
    refs = [Ref(0, "A fine answer. "), Ref(1, "Cut off by an error before")]
    refs[0].state = "complete"
    refs[1].state = "failed"
    block = ReferenceTracker(PromptTemplates(), None).first(view(refs))
    assert "A fine answer." in block and "Cut off" not in block
    assert 'n="2" status="failed, no response">\n\n</draft>' in block
    later = [Ref(0, "Still writing. "), Ref(1, "")]
    tracker = ReferenceTracker(PromptTemplates(), None)
    tracker.first(view(later))
    later[1].grow("Half a thought")
    later[1].state = "failed"
    (part,) = tracker.gains(view(later))
    assert "Half a thought" not in part and 'status="failed, no response"' in part


def test_the_tracker_says_whether_a_first_step_would_quote_anything() -> None:
    tracker = ReferenceTracker(PromptTemplates(), None)
    refs = [Ref(0, "two words"), Ref(1, "")]
    assert not tracker.has_quote(view(refs))  # too short a tail to quote mid-sentence
    refs[1].state = "failed"
    refs[1].grow("Cut off. Before")
    assert not tracker.has_quote(view(refs))  # a failed reference is quoted without text
    refs[0].grow(" end here. And")
    assert tracker.has_quote(view(refs))
    assert "two words end here." in tracker.first(view(refs))
