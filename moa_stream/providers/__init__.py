"""Providers: where a MoA's agents get their streamed completions from."""

from moa_stream.providers._base import Provider, ProviderStream
from moa_stream.providers.openai import OpenAIProvider, OpenAIStream, RetryPolicy, Timeouts
from moa_stream.providers.sse import SSEDecoder, SSEEvent

__all__ = [
    "OpenAIProvider",
    "OpenAIStream",
    "Provider",
    "ProviderStream",
    "RetryPolicy",
    "SSEDecoder",
    "SSEEvent",
    "Timeouts",
]
