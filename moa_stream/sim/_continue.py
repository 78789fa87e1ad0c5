"""Continuations and the prefix cache of the simulated upstream. Pure: no I/O, no clock.

**Continuations.** A request continues an answer when

- *prefill*: its last message is the assistant's, and it asks for it to be continued: vLLM's
  ``continue_final_message: true`` (with ``add_generation_prompt`` false; both true is a 400,
  as vLLM answers), ``"prefix": true`` on the message (DeepSeek, Mistral), or the model
  continues a trailing assistant message by default, as llama.cpp's llama-server does
  (``SimModel.continue_trailing_assistant``). The answer so far is that message.
- *appended turns*: it ends with one or more pairs of an assistant turn and a user turn asking
  to continue (the engine's ``continue_instruction``, recognized by its wording). The answer so
  far is those assistant turns, joined.

Either way, the reply is the rest of the text the model planned for the conversation: the
text depends on the seed, model, sample and the conversation's *anchor* (the messages before
the continuation, the last one cut to its first :data:`ANCHOR_CHARS` characters and before its
first tag: the user's own words, which later steps keep while they append to the prompt or
re-render the quoted drafts), so every step of one staircase continues one planned text.

**Prefix cache.** Each model keeps the prompts it served recently, followed by the text it
generated for them, as chained hashes of :data:`BLOCK_CHARS`-character blocks of the prompt
rendered as a chat template would, as vLLM's automatic prefix caching does with token blocks
(and llama-server's slots with their context). A request pays prefill time only for the blocks
past the longest cached prefix, and reports the others as ``cached_tokens``.
"""

from __future__ import annotations

import hashlib
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "ANCHOR_CHARS",
    "BLOCK_CHARS",
    "ContinuationInfo",
    "PrefixCache",
    "anchor_digest",
    "detect_continuation",
    "render_prompt",
]

#: How much of the last message before a continuation identifies the conversation.
ANCHOR_CHARS = 512
#: The prefix cache's block: 64 characters, about 16 tokens (vLLM's default block size).
BLOCK_CHARS = 64

#: The engine's request to continue (``PromptTemplates.continue_instruction``), by its words.
CONTINUE_RE = re.compile(r"Continue your answer from exactly where it stopped")

Message = tuple[str, str]


@dataclass(frozen=True, slots=True)
class ContinuationInfo:
    """What a request continues: ``kind`` (``None``: nothing, a fresh reply), the answer so
    far, and the messages before the continuation."""

    kind: Literal["prefill", "turns"] | None
    answer: str
    base: tuple[Message, ...]


def detect_continuation(
    messages: Sequence[Message],
    *,
    continue_final_message: bool,
    last_prefix: bool,
    continue_trailing_assistant: bool,
) -> ContinuationInfo:
    """See the module docstring."""
    asked = continue_final_message or last_prefix or continue_trailing_assistant
    if asked and len(messages) >= 2 and messages[-1][0] == "assistant":
        return ContinuationInfo("prefill", messages[-1][1], tuple(messages[:-1]))
    # Appended turns: walk back over (assistant, user asking to continue) pairs. A step that
    # wrote nothing leaves no assistant turn: its request to continue joins the user turn.
    end = len(messages)
    turns: list[str] = []
    while end >= 3 and messages[end - 1][0] == "user" and CONTINUE_RE.search(messages[end - 1][1]):
        if messages[end - 2][0] != "assistant":
            break
        turns.append(messages[end - 2][1])
        end -= 2
    if turns:
        return ContinuationInfo("turns", "".join(reversed(turns)), tuple(messages[:end]))
    return ContinuationInfo(None, "", tuple(messages))


_FIRST_TAG = re.compile(r"<[A-Za-z/]")


def anchor_digest(base: Sequence[Message]) -> str:
    """A digest of the conversation a reply belongs to (see the module docstring): the last
    message counts up to its first tag (quoted material, which a staircase may re-render in
    place at each step) or :data:`ANCHOR_CHARS` characters, whichever comes first."""
    h = hashlib.blake2b(digest_size=16)
    for i, (role, content) in enumerate(base):
        if i == len(base) - 1:
            content = content[:ANCHOR_CHARS]
            tag = _FIRST_TAG.search(content)
            if tag is not None:
                content = content[: tag.start()]
        h.update(role.encode())
        h.update(b"\x00")
        h.update(content.encode("utf-8", "surrogatepass"))
        h.update(b"\x01")
    return h.hexdigest()


def render_prompt(messages: Sequence[Message], *, open_last: bool) -> str:
    """The prompt as a ChatML-like template renders it: what a server tokenizes and caches.
    ``open_last``: the last message is continued (a prefill), so it is left open; otherwise
    the prompt ends with the opening of the assistant's reply (the generation prompt)."""
    parts = []
    last = len(messages) - 1
    for i, (role, content) in enumerate(messages):
        parts.append(f"<|{role}|>\n{content}")
        if not (open_last and i == last):
            parts.append("<|end|>\n")
    if not open_last:
        parts.append("<|assistant|>\n")
    return "".join(parts)


class PrefixCache:
    """One model's recently served prompt prefixes, as chained block hashes, least recently
    used dropped first beyond ``max_blocks``."""

    __slots__ = ("_blocks", "_max")

    def __init__(self, max_blocks: int = 200_000) -> None:
        self._blocks: OrderedDict[int, None] = OrderedDict()
        self._max = max_blocks

    def __len__(self) -> int:
        return len(self._blocks)

    def add(self, text: str) -> None:
        """Cache ``text``'s whole blocks (a prompt followed by the output generated for it:
        servers keep generated tokens in the cache too)."""
        blocks = self._blocks
        chain = 0
        full = len(text) - len(text) % BLOCK_CHARS
        for start in range(0, full, BLOCK_CHARS):
            chain = hash((chain, text[start : start + BLOCK_CHARS]))
            blocks[chain] = None
            blocks.move_to_end(chain)
        while len(blocks) > self._max:
            blocks.popitem(last=False)

    def serve(self, prompt: str) -> int:
        """Characters of ``prompt`` found cached (whole blocks from its start); then the
        prompt's blocks are cached too."""
        blocks = self._blocks
        chain = 0
        cached = 0
        hit = True
        full = len(prompt) - len(prompt) % BLOCK_CHARS
        for start in range(0, full, BLOCK_CHARS):
            chain = hash((chain, prompt[start : start + BLOCK_CHARS]))
            if hit and chain in blocks:
                blocks.move_to_end(chain)
                cached += BLOCK_CHARS
            else:
                hit = False
                blocks[chain] = None
        while len(blocks) > self._max:
            blocks.popitem(last=False)
        return cached
