"""Providers: where a MoA's agents get their streamed completions from."""

from moa_stream.providers._base import Provider, ProviderStream
from moa_stream.providers._estimate import estimate_prompt_tokens
from moa_stream.providers._policy import RetryPolicy, RetrySettings, Timeouts
from moa_stream.providers.anthropic import AnthropicProvider, AnthropicStream
from moa_stream.providers.litellm import LiteLLMProvider, LiteLLMStream
from moa_stream.providers.openai import OpenAIProvider, OpenAIStream
from moa_stream.providers.sse import SSEDecoder, SSEEvent

__all__ = [
    "AnthropicProvider",
    "AnthropicStream",
    "LiteLLMProvider",
    "LiteLLMStream",
    "OpenAIProvider",
    "OpenAIStream",
    "Provider",
    "ProviderStream",
    "RetryPolicy",
    "RetrySettings",
    "SSEDecoder",
    "SSEEvent",
    "Timeouts",
    "estimate_prompt_tokens",
]
