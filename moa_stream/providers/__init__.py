"""Providers: where a MoA's agents get their streamed completions from."""

from moa_stream.providers._base import Provider, ProviderStream

__all__ = ["Provider", "ProviderStream"]
