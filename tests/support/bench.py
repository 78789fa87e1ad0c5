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

# A bench config with the proposers "fast" and "mid" of MODELS behind one provider; the
# aggregator's model is a parameter so a test can swap in a model of its own.
DUO_CONFIG = """
[providers.upstream]
base_url = "{base_url}"

[agents.fast]
provider = "upstream"
model = "fast"

[agents.mid]
provider = "upstream"
model = "mid"

[agents.agg]
provider = "upstream"
model = "{aggregator}"

[moa.duo]
proposers = ["fast", "mid"]
aggregator = "agg"
"""
