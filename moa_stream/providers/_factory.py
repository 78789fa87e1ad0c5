"""A provider from its configured ``kind``: the one place that knows every kind."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

from moa_stream._exceptions import ConfigError
from moa_stream.providers._base import Provider
from moa_stream.providers._policy import RetrySettings, Timeouts

__all__ = ["PROVIDER_KINDS", "build_provider"]

#: What ``kind`` may say in a provider's configuration. ``sim`` is an ``openai`` provider
#: pointed at the in-process simulator.
PROVIDER_KINDS: tuple[str, ...] = ("openai", "sim", "anthropic", "litellm")


def build_provider(
    kind: str,
    base_url: str | None,
    *,
    name: str,
    api_key: str | None = None,
    api_key_env: str | None = None,
    headers: Mapping[str, str] | None = None,
    max_tokens_field: Literal["max_tokens", "max_completion_tokens"] = "max_tokens",
    limit: int = 100,
    timeouts: Timeouts | None = None,
    retry: RetrySettings | None = None,
    continuation: Sequence[str] | None = None,
) -> Provider:
    """The provider a configuration describes; ``kind`` is one of :data:`PROVIDER_KINDS`.

    ``continuation`` (the staircase's notation) replaces the kind's default where the kind
    lets it (not for ``anthropic``, whose API fixes it).
    """
    if kind in ("openai", "sim"):
        from moa_stream.providers.openai import OpenAIProvider

        if base_url is None:
            raise ConfigError("is required for an OpenAI-compatible provider", path="base_url")
        return OpenAIProvider(
            base_url,
            name=name,
            api_key=api_key,
            api_key_env=api_key_env,
            headers=headers,
            max_tokens_field=max_tokens_field,
            limit=limit,
            timeouts=timeouts,
            retry=retry,
            continuation=continuation or ("turns",),
        )
    if kind == "anthropic":
        from moa_stream.providers.anthropic import AnthropicProvider

        return AnthropicProvider(
            base_url or "https://api.anthropic.com",
            name=name,
            api_key=api_key,
            api_key_env=api_key_env,
            headers=headers,
            limit=limit,
            timeouts=timeouts,
            retry=retry,
        )
    if kind == "litellm":
        from moa_stream.providers.litellm import LiteLLMProvider

        return LiteLLMProvider(
            name=name,
            api_base=base_url,
            api_key=api_key,
            api_key_env=api_key_env,
            options={"extra_headers": dict(headers)} if headers else None,
            timeouts=timeouts,
            retry=retry,
            continuation=continuation or ("turns",),
        )
    raise ConfigError(f"must be one of {', '.join(PROVIDER_KINDS)}, got {kind!r}", path="kind")
