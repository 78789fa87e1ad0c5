"""The reference MoA: the original method, with proposers that are not streamed."""

from __future__ import annotations

from types import MappingProxyType

import aiohttp
import pytest
from support.bench import MODELS

from moa_stream.bench.baseline import ChatAPI, ReferenceMoA, run_reference
from moa_stream.engine import Agent
from moa_stream.providers import OpenAIProvider
from moa_stream.sim import SimServer
from moa_stream.sim.quiz import QUESTIONS, extract_answer

# The simulator fixture: the fast models of support.bench.
pytestmark = pytest.mark.moa_sim(*MODELS, seed=0)


async def test_reference_moa_sends_non_streaming_proposer_requests(sim: SimServer) -> None:
    agents = {m.name: Agent(m.name, OpenAIProvider(sim.base_url), m.name) for m in MODELS}
    spec = ReferenceMoA((agents["fast"], agents["mid"], agents["slow"]), agents["agg"], layers=2)
    endpoints = MappingProxyType({name: ChatAPI(sim.base_url) for name in agents})
    try:
        async with aiohttp.ClientSession() as session:
            result = await run_reference(
                spec,
                [{"role": "user", "content": QUESTIONS[4].prompt}],
                session=session,
                endpoints=endpoints,
            )
    finally:
        for agent in agents.values():
            await agent.provider.aclose()
    await sim.wait_idle()

    proposer_records = [r for r in sim.records if r.model != "agg"]
    (aggregator_record,) = [r for r in sim.records if r.model == "agg"]
    assert len(proposer_records) == 6  # three proposers, two layers
    assert all(not r.stream and r.outcome == "complete" for r in proposer_records)
    assert aggregator_record.stream

    # Every layer waited for all of its proposers: the second started after the first ended.
    first_layer_end = max(r.finished_at or 0.0 for r in proposer_records[:3])
    assert min(r.received_at for r in proposer_records[3:]) >= first_layer_end

    trace = result.trace
    assert result.error is None and extract_answer(result.text) is not None
    assert [layer.reason for layer in trace.layers] == ["all", "all"]
    assert all(not c.streamed for c in trace.calls if c.role == "proposer")
    assert trace.ttft_s is not None and trace.ttft_s <= trace.total_s
    assert trace.layers[1].decided_s <= trace.ttft_s
    assert result.usage.prompt_tokens > 0 and result.usage.completion_tokens > 0


async def test_reference_moa_goes_on_without_a_proposer_that_keeps_failing(sim: SimServer) -> None:
    agents = {m.name: Agent(m.name, OpenAIProvider(sim.base_url), m.name) for m in MODELS}
    spec = ReferenceMoA((agents["fast"], agents["mid"]), agents["agg"], max_attempts=1)
    endpoints = MappingProxyType(
        {
            "fast": ChatAPI(sim.base_url),
            "mid": ChatAPI(sim.url + "/nowhere"),  # 404: not retried, not fatal
            "agg": ChatAPI(sim.base_url),
        }
    )
    try:
        async with aiohttp.ClientSession() as session:
            result = await run_reference(
                spec,
                [{"role": "user", "content": QUESTIONS[0].prompt}],
                session=session,
                endpoints=endpoints,
            )
    finally:
        for agent in agents.values():
            await agent.provider.aclose()
    statuses = [r.status for r in result.trace.layers[0].references]
    assert statuses == ["complete", "failed"]
    assert result.error is None and result.text
