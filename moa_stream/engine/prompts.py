"""Building the prompt an aggregator (or a refinement-layer proposer) receives.

Layout, chosen so that provider prefix caches help: the aggregator's instructions come first (in
the system message), then the user's conversation unchanged, and only then, appended to the last
user message, the numbered references. Everything before the references is identical for every
aggregation of the same conversation, including a later refresh with newer partial text.

Each reference is marked ``complete``, ``partial`` (still being written when it was taken: it
may stop mid-sentence and may not have reached its conclusion) or ``failed``. Only answer
content is ever fed forward; reasoning text is never tracked, so it cannot leak into a prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from moa_stream._types import ChatMessage
from moa_stream.engine.layer import Reference

__all__ = ["PromptTemplates", "build_reference_messages", "with_system_prompt"]

DEFAULT_INSTRUCTIONS = (
    "You will be shown several candidate responses to the user's latest message, written "
    "independently by other assistants. Read them critically: some may be wrong, biased or "
    "incomplete. Write one answer of your own that keeps what is correct and well argued in "
    "them, corrects or drops what is not, and fills any gaps. Do not copy any response as it "
    "is and do not mention the candidates or their numbering; answer the user directly. A "
    "response marked partial was still being written when it was given to you: it may stop "
    "mid-sentence and may not have reached its conclusion, so weigh it accordingly. A "
    "response marked failed produced nothing."
)

DEFAULT_HEADER = "Candidate responses to the message above:"

STATUS_LABELS = {
    "complete": "complete",
    "partial": "partial, still being written",
    "failed": "failed, no response",
}


@dataclass(frozen=True, slots=True)
class PromptTemplates:
    """The words used around the references. ``reference`` is formatted with ``number``,
    ``status`` (a label from ``status_labels``) and ``text``."""

    instructions: str = DEFAULT_INSTRUCTIONS
    header: str = DEFAULT_HEADER
    reference: str = "### Response {number} ({status})\n{text}"
    truncated_marker: str = " [...]"


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
    system = t.instructions if not system_prompt else f"{system_prompt}\n\n{t.instructions}"
    out = with_system_prompt(messages, system)
    blocks = [t.header]
    for number, ref in enumerate(references, 1):
        text = _cap(ref.text, max_reference_chars, t.truncated_marker) if ref.text else ""
        blocks.append(
            t.reference.format(number=number, status=STATUS_LABELS[ref.status], text=text)
        )
    block = "\n\n".join(blocks)
    # Appending to the last user message (instead of adding a message) keeps strict
    # user/assistant alternation, which several chat templates enforce.
    if out and out[-1]["role"] == "user":
        last = out[-1]
        out[-1] = {"role": "user", "content": f"{last['content']}\n\n{block}"}
    else:
        out.append({"role": "user", "content": block})
    return out
