"""Request bodies and paths shared by the tests."""

from __future__ import annotations

from typing import Any

#: The chat route under the server's root (the simulator's ``base_url`` already ends in /v1).
CHAT = "/v1/chat/completions"


def body(
    model: str = "fast", content: str = "Why is the sky blue?", **extra: Any
) -> dict[str, Any]:
    """A chat-completions body with one user message."""
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}
