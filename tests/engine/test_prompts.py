"""The aggregator prompt: stable prefix, numbered references with their status, capped text."""

from __future__ import annotations

from moa_stream.engine import PromptTemplates, Reference, build_reference_messages
from moa_stream.engine.prompts import with_system_prompt

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Name a prime."},
]


def refs(*items: tuple[str, str]) -> list[Reference]:
    return [Reference(f"a{i}", i, status, text) for i, (status, text) in enumerate(items)]  # type: ignore[arg-type]


def test_references_are_numbered_marked_and_appended_to_the_last_user_message() -> None:
    out = build_reference_messages(
        CONVERSATION, refs(("complete", "7"), ("partial", "Eleven is"), ("failed", ""))
    )
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    last = out[-1]["content"]
    assert last.startswith("Name a prime.\n\n")
    assert "### Response 1 (complete)\n7" in last
    assert "### Response 2 (partial, still being written)\nEleven is" in last
    assert "### Response 3 (failed, no response)" in last
    assert last.index("Response 1") < last.index("Response 2") < last.index("Response 3")


def test_prefix_is_identical_whatever_the_references() -> None:
    a = build_reference_messages(CONVERSATION, refs(("partial", "Sev")))
    b = build_reference_messages(CONVERSATION, refs(("complete", "Seven"), ("complete", "11")))
    assert a[:-1] == b[:-1]
    assert a[-1]["content"].split("\n\n")[0] == b[-1]["content"].split("\n\n")[0]
    # the user's own system message is kept, after the instructions
    assert a[0]["content"].endswith("Be brief.")
    assert a[0]["content"].startswith(PromptTemplates().instructions)


def test_the_callers_messages_are_not_modified() -> None:
    before = [dict(m) for m in CONVERSATION]
    build_reference_messages(CONVERSATION, refs(("complete", "7")), system_prompt="You are terse.")
    assert before == CONVERSATION


def test_references_are_capped_in_length() -> None:
    out = build_reference_messages(
        CONVERSATION, refs(("complete", "x" * 1000)), max_reference_chars=100
    )
    body = out[-1]["content"].split("(complete)\n", 1)[1]
    assert body == "x" * 100 + PromptTemplates().truncated_marker


def test_a_conversation_ending_in_an_assistant_message_gets_a_user_message() -> None:
    convo = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel"}]
    out = build_reference_messages(convo, refs(("complete", "Hello")))
    assert out[-1]["role"] == "user" and "Hello" in out[-1]["content"]


def test_agent_system_prompt_merges_into_one_system_message() -> None:
    out = with_system_prompt(CONVERSATION, "You are terse.")
    assert sum(m["role"] == "system" for m in out) == 1
    assert out[0]["content"] == "You are terse.\n\nBe brief."
    assert with_system_prompt(CONVERSATION[1:], "S")[0] == {"role": "system", "content": "S"}
