"""Shared pieces of the benchmark tests: fast fixed-latency simulated models."""

from __future__ import annotations

from moa_stream.sim import LatencyProfile, SimModel


def fast_model(name: str, ttft: float, accuracy: float = 0.7, tokens: int = 16) -> SimModel:
    return SimModel(
        name=name,
        latency=LatencyProfile.fixed(ttft=ttft, tokens_per_s=800.0),
        answer_tokens=tokens,
        accuracy=accuracy,
    )


MODELS = (
    fast_model("fast", 0.01, 0.55),
    fast_model("mid", 0.02, 0.70),
    fast_model("slow", 0.04, 0.85),
    fast_model("agg", 0.01, 0.80),
)
