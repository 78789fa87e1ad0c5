"""The simulated OpenAI-compatible upstream.

A real aiohttp server that hosts any number of named simulated models, with seeded latency
(TTFT with prefill, queueing and heavy tails; decode rate with jitter), seeded faults (429, 500,
stalls, resets, malformed chunks, error frames, keep-alive comments) and a quiz quality model
for offline benchmarks. Each model continues answers (assistant prefill, appended "continue"
turns) as faithfully as its :class:`ContinuationProfile` says: ``perfect`` by default, or with
the restarts, early stops and copied markup of a ``strong`` or a ``small`` real model. Tests
run it in-process on port 0; ``moa-stream sim`` runs it alone.

::

    from moa_stream.sim import LatencyProfile, SimModel, SimServer

    model = SimModel(name="m", latency=LatencyProfile.fixed(ttft=0.02, tokens_per_s=500))
    async with SimServer(models=[model], seed=0) as sim:
        ...  # point any OpenAI client at sim.base_url

See ``docs/simulator.md``.
"""

from moa_stream.sim._config import SimSettings, load_sim_config, models_from_table
from moa_stream.sim.profiles import (
    CONTINUATION_PROFILES,
    FAULT_KINDS,
    PROFILES,
    ContinuationProfile,
    FaultKind,
    FaultProfile,
    LatencyProfile,
    SimModel,
    default_models,
)
from moa_stream.sim.server import Outcome, SimRecord, SimServer

__all__ = [
    "CONTINUATION_PROFILES",
    "ContinuationProfile",
    "FAULT_KINDS",
    "FaultKind",
    "FaultProfile",
    "LatencyProfile",
    "Outcome",
    "PROFILES",
    "SimModel",
    "SimRecord",
    "SimServer",
    "SimSettings",
    "default_models",
    "load_sim_config",
    "models_from_table",
]
