"""Building the prompt an aggregator (or a refinement-layer proposer) receives.

Layout, chosen for provider prefix caches and against parroting:

1. the agent's own system prompt, if any, merged into the conversation's system message;
2. the user's conversation, unchanged: exactly what the proposers were sent, so the server
   that just prefilled it for a proposer can serve the aggregator's prompt from its cache up
   to the end of the last user message;
3. appended to that last user message: a one-line note, then the references, each quoted
   between ``<draft>`` and ``</draft>`` tags (they read as quoted material, not as a format
   to continue: small models copied the old ``### Response N`` headings into their answers),
   and only then the instructions, so the last thing the model reads is what to do.

Each reference is marked ``complete``, ``partial`` (still being written when it was taken: it
may stop mid-sentence and may not have reached its conclusion) or ``failed``. Only answer
content is ever fed forward; reasoning text is never tracked, so it cannot leak into a prompt.

A staircase aggregator (:mod:`moa_stream.engine.staircase`) extends this prompt step by step
with :func:`render_update`: each step only appends to the previous step's request.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from moa_stream._types import ChatMessage
from moa_stream.engine.layer import Reference

__all__ = [
    "PromptTemplates",
    "build_reference_messages",
    "render_draft",
    "render_references",
    "render_update",
    "whole_layout",
    "with_system_prompt",
]

# The references are "notes", the user's message "the question", and the instructions end by
# asking for the answer alone: worded around drafts and "the message", a small aggregator
# (SmolLM2-135M, twenty open-ended questions, every reference complete) wrote about them in 6
# answers of 20 ("This draft is not complete yet.", "I'd like to add my perspective to the
# user's message.") and restarted itself 3.65 times an answer; worded so, in 1 and 2.5 times
# (benchmarks/prompt_wording.py, docs/real-inference.md).
DEFAULT_INSTRUCTIONS = (
    "Using the notes above where they help, answer the user's question in your own words. "
    "Some notes may be wrong or incomplete: keep what is correct, fix or leave out what is "
    "not, and fill any gaps. Reply with the answer alone, as if you were answering the "
    "question directly."
)

#: Said after the instructions only when a quoted reference is not complete, and only where
#: the labels are shown: a label the prompt does not need to explain is one less to copy.
DEFAULT_STATUS_NOTE = (
    "A note marked partial is unfinished: it may stop mid-sentence and may not have reached "
    "its conclusion. A note marked failed produced nothing."
)

#: The ``whole`` staircase layout's instructions: the same (it shows no labels).
WHOLE_INSTRUCTIONS = DEFAULT_INSTRUCTIONS

DEFAULT_HEADER = (
    'Notes from other assistants on the question above, each between <draft n="..."> and </draft>:'
)

DEFAULT_UPDATE_HEADER = "The notes went on. What they added since, quoted the same way:"

DEFAULT_CONTINUE = (
    "Continue your answer from exactly where it stopped, taking this into account. Do not "
    "repeat what you already wrote and do not start over."
)

#: The ``whole`` layout's continue turn: it follows the answer so far, not an update block.
WHOLE_CONTINUE = (
    "Continue your answer from exactly where it stopped, taking the notes above into account. "
    "Do not repeat what you already wrote and do not start over."
)

DEFAULT_DRAFT = '<draft n="{number}" status="{status}">\n{text}\n</draft>'
WHOLE_DRAFT = '<draft n="{number}">\n{text}\n</draft>'

STATUS_LABELS = {
    "complete": "complete",
    "partial": "partial, still being written",
    "failed": "failed, no response",
    "cancelled": "given up on, unfinished",
}


@dataclass(frozen=True, slots=True)
class PromptTemplates:
    """The words used around the references.

    ``draft`` is formatted with ``number``, ``status`` (a label from ``STATUS_LABELS``) and
    ``text``; ``status_note`` follows the instructions when a quoted reference is not complete;
    ``update_header`` and ``continue_instruction`` are used by staircase steps.
    """

    instructions: str = DEFAULT_INSTRUCTIONS
    status_note: str = DEFAULT_STATUS_NOTE
    header: str = DEFAULT_HEADER
    draft: str = DEFAULT_DRAFT
    truncated_marker: str = " [...]"
    update_header: str = DEFAULT_UPDATE_HEADER
    continued_draft: str = '<draft n="{number}" status="{status}" continued>\n{text}\n</draft>'
    continue_instruction: str = DEFAULT_CONTINUE

    def prose(self) -> tuple[str, ...]:
        """The sentences the templates write themselves (instructions, status note, headers,
        continue request), which an aggregator's answer should never repeat; empty ones left
        out."""
        texts = (
            self.instructions,
            self.status_note,
            self.header,
            self.update_header,
            self.continue_instruction,
        )
        return tuple(text for text in texts if text)


def whole_layout(t: PromptTemplates) -> PromptTemplates:
    """The templates of a staircase's ``whole`` layout: drafts quoted without a status label and
    instructions that do not mention one. Small models copy such labels ("still being written")
    into their answers or answer them ("This is a complete answer"); a draft the staircase
    quotes in this layout always ends at a sentence end, so it reads as a short draft rather
    than an interrupted one. Templates changed from the defaults are kept as they are."""
    defaults = PromptTemplates()
    return replace(
        t,
        draft=WHOLE_DRAFT if t.draft == defaults.draft else t.draft,
        instructions=WHOLE_INSTRUCTIONS
        if t.instructions == defaults.instructions
        else t.instructions,
        status_note="" if t.status_note == defaults.status_note else t.status_note,
        continue_instruction=(
            WHOLE_CONTINUE
            if t.continue_instruction == defaults.continue_instruction
            else t.continue_instruction
        ),
    )


def _cap(text: str, limit: int | None, marker: str) -> str:
    if limit is None or len(text) <= limit:
        return text
    return text[:limit].rstrip() + marker


def with_system_prompt(
    messages: Sequence[ChatMessage], system_prompt: str | None
) -> list[ChatMessage]:
    """``messages`` with ``system_prompt`` in front: merged into the conversation's own system
    message if it has one (many chat templates accept only one, and only first)."""
    out = list(messages)
    if not system_prompt:
        return out
    if out and out[0]["role"] == "system":
        out[0] = {"role": "system", "content": f"{system_prompt}\n\n{out[0]['content']}"}
    else:
        out.insert(0, {"role": "system", "content": system_prompt})
    return out


def render_draft(
    number: int, status: str, text: str, t: PromptTemplates, *, continued: bool = False
) -> str:
    """One quoted reference (or, ``continued``, the text it added since it was last quoted)."""
    template = t.continued_draft if continued else t.draft
    return template.format(number=number, status=STATUS_LABELS.get(status, status), text=text)


def render_references(
    references: Sequence[Reference],
    t: PromptTemplates,
    *,
    max_reference_chars: int | None = None,
    numbers: Sequence[int] | None = None,
) -> str:
    """The block appended to the last user message: note, quoted references, instructions.

    References are numbered from 1 in the order given, unless ``numbers`` gives each one's.
    """
    blocks = [t.header]
    for i, ref in enumerate(references):
        text = _cap(ref.text, max_reference_chars, t.truncated_marker) if ref.text else ""
        number = numbers[i] if numbers is not None else i + 1
        blocks.append(render_draft(number, ref.status, text, t))
    blocks.append(t.instructions)
    if t.status_note and any(ref.status != "complete" for ref in references):
        blocks.append(t.status_note)
    return "\n\n".join(blocks)


def render_update(parts: Sequence[str], t: PromptTemplates, *, ask_to_continue: bool) -> str:
    """A staircase step's addition: what the references gained, already rendered with
    :func:`render_draft` (``continued`` for references quoted before)."""
    blocks = [t.update_header, *parts]
    if ask_to_continue:
        blocks.append(t.continue_instruction)
    return "\n\n".join(blocks)


def append_to_last_user(messages: list[ChatMessage], block: str) -> list[ChatMessage]:
    """``messages`` with ``block`` appended to the last user message (a new user message if the
    conversation does not end with one). Appending instead of adding a message keeps strict
    user/assistant alternation, which several chat templates enforce."""
    if messages and messages[-1]["role"] == "user":
        last = messages[-1]
        messages[-1] = {"role": "user", "content": f"{last['content']}\n\n{block}"}
    else:
        messages.append({"role": "user", "content": block})
    return messages


def build_reference_messages(
    messages: Sequence[ChatMessage],
    references: Sequence[Reference],
    *,
    templates: PromptTemplates | None = None,
    system_prompt: str | None = None,
    max_reference_chars: int | None = None,
) -> list[ChatMessage]:
    """The messages for a model that synthesizes ``references`` into an answer to
    ``messages``. References keep the order given; they are numbered from 1."""
    t = templates or PromptTemplates()
    out = with_system_prompt(messages, system_prompt)
    block = render_references(references, t, max_reference_chars=max_reference_chars)
    return append_to_last_user(out, block)
