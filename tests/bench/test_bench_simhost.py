"""The simulator in a child process: started, serving, restarted, stopped."""

from __future__ import annotations

import aiohttp
from support.bench import MODELS

from moa_stream.bench import QUICK, SCENARIOS
from moa_stream.bench._simhost import ProcessSimHost


async def test_process_host_serves_and_restarts_the_simulator() -> None:
    async with ProcessSimHost(use_uvloop=False) as host, aiohttp.ClientSession() as session:
        url = await host.start(MODELS[:2], seed=1)
        async with session.get(url + "/models") as resp:
            assert resp.status == 200
            names = [m["id"] for m in (await resp.json())["data"]]
        assert names == ["fast", "mid"]
        second = await host.start(MODELS[2:], seed=1)
        async with session.get(second + "/models") as resp:
            assert [m["id"] for m in (await resp.json())["data"]] == ["slow", "agg"]
        await host.stop()


def test_built_in_scenarios_are_well_formed() -> None:
    for scenario in (*SCENARIOS.values(), QUICK):
        assert len(scenario.proposers) >= 2
        assert scenario.best in scenario.models
    heterogeneous = SCENARIOS["heterogeneous"]
    assert heterogeneous.strategies is None  # every strategy runs on the headline scenario
    assert heterogeneous.best.name == "large-slow"
    half = heterogeneous.scaled(0.5)
    assert half.proposers[0].latency.ttft_p50 == heterogeneous.proposers[0].latency.ttft_p50 / 2
