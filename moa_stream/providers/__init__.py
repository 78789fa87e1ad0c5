"""Providers: where a MoA's agents get their streamed completions from."""

from moa_stream.providers._base import Continuation, Provider, ProviderStream
from moa_stream.providers._estimate import estimate_prompt_tokens
from moa_stream.providers.openai import OpenAIProvider, OpenAIStream, RetryPolicy, Timeouts
from moa_stream.providers.sse import SSEDecoder, SSEEvent

__all__ = [
    "Continuation",
    "OpenAIProvider",
    "OpenAIStream",
    "Provider",
    "ProviderStream",
    "RetryPolicy",
    "SSEDecoder",
    "SSEEvent",
    "Timeouts",
    "estimate_prompt_tokens",
]
