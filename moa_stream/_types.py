"""Value types shared by providers, the engine and the server.

They are small, frozen where they can be, and slotted: one :class:`Delta` is built per upstream
chunk, so it must cost as little as possible.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NotRequired, TypedDict

__all__ = [
    "ChatMessage",
    "ChatRequest",
    "Delta",
    "StreamTimings",
    "Usage",
    "content_text",
    "estimate_tokens",
    "sampling_fields",
]


class ChatMessage(TypedDict):
    """One chat message in the OpenAI shape. Plain dicts, so orjson writes them as they are.
    ``prefix`` marks a final assistant message to be continued (DeepSeek, Mistral)."""

    role: str
    content: str
    name: NotRequired[str]
    prefix: NotRequired[bool]


def content_text(content: object) -> str:
    """The text of a message's ``content``: the string itself, or the ``text`` of its content
    parts (blocks) when it is a list of them; parts without text, such as images, add nothing."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """A chat-completions request, independent of any provider's wire details.

    ``extra`` holds fields passed through to the upstream body unchanged (``top_p``, ``seed``,
    vendor options ...). ``max_tokens`` is sent under the field name the provider is configured
    with (``max_tokens`` or ``max_completion_tokens``).
    """

    messages: Sequence[ChatMessage]
    model: str
    temperature: float | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    #: The prompt up to the end of its last user message will be sent again as the start of
    #: later requests (a staircase's steps). Providers with explicit prompt caching (Anthropic's
    #: ``cache_control``) mark it; the others, whose servers cache prefixes on their own,
    #: ignore it.
    cache_prefix: bool = False


def sampling_fields(
    request: ChatRequest,
    *,
    temperature: str = "temperature",
    max_tokens: str = "max_tokens",
    stop: str = "stop",
) -> dict[str, Any]:
    """The sampling fields ``request`` sets (``temperature``, ``max_tokens``, a non-empty
    ``stop`` as a list), under the names a wire format or a trace gives them; those it leaves
    unset are left out."""
    fields: dict[str, Any] = {}
    if request.temperature is not None:
        fields[temperature] = request.temperature
    if request.max_tokens is not None:
        fields[max_tokens] = request.max_tokens
    if request.stop:
        fields[stop] = list(request.stop)
    return fields


def estimate_tokens(chars: int) -> int:
    """Tokens in ``chars`` characters of text, when no server counted them: one per four
    characters, rounded up (the usual figure for English with BPE tokenizers).

    The package's only estimator, so every estimated figure (usage, reference sizes, progress
    counts) agrees with every other.
    """
    return (chars + 3) // 4


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one request.

    ``estimated`` is true when the server sent no counts and the figures are this library's
    guess (output: :func:`estimate_tokens` of the text received; input: the same, plus a per-message
    allowance for the chat template); show such figures as estimates. ``cached_prompt_tokens``
    is the part of the prompt the server read from its prompt cache, when it says so (OpenAI's
    ``prompt_tokens_details.cached_tokens``, Anthropic's ``cache_read_input_tokens``).
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated: bool = False
    cached_prompt_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
            self.estimated or other.estimated,
            self.cached_prompt_tokens + other.cached_prompt_tokens,
        )


@dataclass(frozen=True, slots=True)
class Delta:
    """One piece of a streamed answer.

    ``content`` is answer text (possibly empty), ``reasoning`` is reasoning text kept apart
    (never fed back to a model), ``finish_reason`` is set on the chunk that ends the choice, and
    ``usage`` on the chunk that carries the server's token counts.
    """

    content: str = ""
    reasoning: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None


@dataclass(slots=True)
class StreamTimings:
    """Timestamps of one stream on the monotonic clock (``time.monotonic()``, seconds).

    ``chunk_times`` holds the arrival time of every delta passed to the caller. ``attempts``
    counts the requests sent (1 + retries).
    """

    started: float = 0.0
    request_sent: float | None = None
    headers: float | None = None
    first_token: float | None = None
    end: float | None = None
    chunk_times: list[float] = field(default_factory=list)
    attempts: int = 0

    def _since_started(self, t: float | None) -> float | None:
        return None if t is None else t - self.started

    @property
    def ttft(self) -> float | None:
        """Seconds from :attr:`started` to the first content token, if one arrived."""
        return self._since_started(self.first_token)

    @property
    def duration(self) -> float | None:
        return self._since_started(self.end)
