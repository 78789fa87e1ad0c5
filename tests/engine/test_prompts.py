"""The aggregator prompt: the conversation first and unchanged, quoted references with their
status, instructions after them, capped text."""

from __future__ import annotations

from collections.abc import Sequence

from moa_stream._types import ChatMessage
from moa_stream.engine import PromptTemplates, Reference, build_reference_messages
from moa_stream.engine.prompts import whole_layout, with_system_prompt

CONVERSATION: list[ChatMessage] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Name a prime."},
]


def refs(*items: tuple[str, str]) -> list[Reference]:
    return [Reference(f"a{i}", i, status, text) for i, (status, text) in enumerate(items)]  # type: ignore[arg-type]


def render(messages: Sequence[ChatMessage]) -> str:
    """A chat template of the usual shape (ChatML): what a server tokenizes and caches."""
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


def shared_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def test_references_are_quoted_marked_and_appended_to_the_last_user_message() -> None:
    out = build_reference_messages(
        CONVERSATION, refs(("complete", "7"), ("partial", "Eleven is"), ("failed", ""))
    )
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    last = out[-1]["content"]
    assert last.startswith("Name a prime.\n\n")
    assert '<draft n="1" status="complete">\n7\n</draft>' in last
    assert '<draft n="2" status="partial, still being written">\nEleven is\n</draft>' in last
    assert '<draft n="3" status="failed, no response">' in last
    assert last.index('n="1"') < last.index('n="2"') < last.index('n="3"')
    assert "### Response" not in last


def test_instructions_come_after_the_references() -> None:
    out = build_reference_messages(CONVERSATION, refs(("complete", "7")))
    last = out[-1]["content"]
    assert last.endswith(PromptTemplates().instructions)
    assert last.rindex("</draft>") < last.index(PromptTemplates().instructions)
    assert out[0] == CONVERSATION[0]  # the system message is the user's, untouched


def test_the_labels_are_explained_only_when_a_reference_is_not_complete() -> None:
    t = PromptTemplates()
    whole = build_reference_messages(CONVERSATION, refs(("complete", "7"), ("complete", "11")))
    assert t.status_note not in whole[-1]["content"]
    assert "partial" not in whole[-1]["content"] and "failed" not in whole[-1]["content"]
    part = build_reference_messages(CONVERSATION, refs(("complete", "7"), ("partial", "Eleven")))
    assert part[-1]["content"].endswith(f"{t.instructions}\n\n{t.status_note}")
    # The whole layout shows no labels, so it has nothing to explain.
    unlabelled = whole_layout(t)
    assert unlabelled.status_note == ""
    custom = whole_layout(PromptTemplates(status_note="Partial means unfinished."))
    assert custom.status_note == "Partial means unfinished."


def test_the_aggregator_prompt_extends_what_the_proposers_were_sent() -> None:
    """The proposers' requests and the aggregator's share everything up to the end of the last
    user message's text: a prefix cache that holds a proposer's prompt serves it."""
    proposer = render(with_system_prompt(CONVERSATION, None))
    aggregator = render(build_reference_messages(CONVERSATION, refs(("complete", "7" * 500))))
    conversation_text = proposer.removesuffix("<|im_end|>\n")
    assert shared_prefix(proposer, aggregator) == len(conversation_text)
    # and the references change nothing before them
    other = render(build_reference_messages(CONVERSATION, refs(("partial", "Sev"))))
    assert shared_prefix(aggregator, other) > len(conversation_text)


def test_the_callers_messages_are_not_modified() -> None:
    before = [dict(m) for m in CONVERSATION]
    build_reference_messages(CONVERSATION, refs(("complete", "7")), system_prompt="You are terse.")
    assert before == CONVERSATION


def test_references_are_capped_in_length() -> None:
    out = build_reference_messages(
        CONVERSATION, refs(("complete", "x" * 1000)), max_reference_chars=100
    )
    body = out[-1]["content"].split('status="complete">\n', 1)[1].split("\n</draft>")[0]
    assert body == "x" * 100 + PromptTemplates().truncated_marker


def test_a_conversation_ending_in_an_assistant_message_gets_a_user_message() -> None:
    convo: list[ChatMessage] = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hel"},
    ]
    out = build_reference_messages(convo, refs(("complete", "Hello")))
    assert out[-1]["role"] == "user" and "Hello" in out[-1]["content"]


def test_agent_system_prompt_merges_into_one_system_message() -> None:
    out = with_system_prompt(CONVERSATION, "You are terse.")
    assert sum(m["role"] == "system" for m in out) == 1
    assert out[0]["content"] == "You are terse.\n\nBe brief."
    assert with_system_prompt(CONVERSATION[1:], "S")[0] == {"role": "system", "content": "S"}
