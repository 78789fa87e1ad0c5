"""The pytest plugin, run by pytest inside pytest (``pytester``): fixtures ``moa_sim`` and
``scripted_provider``, loaded through the package's ``pytest11`` entry point."""

from __future__ import annotations

import pytest
from support.integrations import INNER

from moa_stream.sim import PROFILES, FaultProfile, SimModel

ASYNCIO_INI = """
[pytest]
asyncio_mode = {mode}
asyncio_default_fixture_loop_scope = function
filterwarnings = error
"""

USES_THE_FIXTURES = """
import aiohttp
import pytest

from moa_stream import Agent, OpenAIProvider, RetryPolicy, single
from moa_stream.sim import FaultProfile, SimModel
from moa_stream.testing import Script, collect_events


async def test_default_models(moa_sim):
    assert set(moa_sim.models) == {"fast", "slow"}
    async with aiohttp.ClientSession() as s, s.get(moa_sim.base_url + "/models") as r:
        assert [m["id"] for m in (await r.json())["data"]] == ["fast", "slow"]


@pytest.mark.moa_sim("small-fast", SimModel("flaky"), faults={"flaky": {"server_error": 1.0}},
                     seed=3, speed=0.01)
async def test_marker_chooses_models_and_faults(moa_sim):
    assert moa_sim.seed == 3
    assert moa_sim.models["small-fast"].latency.ttft_p50 == pytest.approx(0.0025)
    async with OpenAIProvider(moa_sim.base_url, retry=RetryPolicy(max_attempts=1)) as provider:
        result = await single(Agent("a", provider, "small-fast")).stream(
            [{"role": "user", "content": "hi"}]).final()
        assert result.text
        run = single(Agent("b", provider, "flaky")).stream([{"role": "user", "content": "hi"}])
        with pytest.raises(Exception, match="500"):
            await run.final()
    assert [r.status for r in moa_sim.records] == [200, 500]


async def test_scripted_provider(scripted_provider):
    provider = scripted_provider(m=Script(tokens=("a", "b")))
    events = await collect_events(single(Agent("x", provider, "m")).stream(
        [{"role": "user", "content": "hi"}]))
    assert events[-1].report.text == "ab"
    assert provider.opened == provider.closed == 1
"""


def test_fixtures_in_a_fresh_process(pytester: pytest.Pytester) -> None:
    """A separate pytest process finds the plugin through the entry point alone."""
    pytester.makeini(ASYNCIO_INI.format(mode="auto"))
    pytester.makepyfile(test_uses=USES_THE_FIXTURES)
    result = pytester.runpytest_subprocess(*INNER)
    result.assert_outcomes(passed=3)


def test_strict_mode_and_a_second_registration(pytester: pytest.Pytester) -> None:
    """In pytest-asyncio's strict mode the async fixture still works, and a conftest that also
    names the plugin in ``pytest_plugins`` does not register it twice."""
    pytester.makeini(ASYNCIO_INI.format(mode="strict"))
    pytester.makeconftest('pytest_plugins = ["moa_stream.pytest_plugin"]')
    pytester.makepyfile(
        test_strict="""
        import pytest

        @pytest.mark.asyncio
        async def test_sim(moa_sim):
            assert moa_sim.port > 0
        """
    )
    result = pytester.runpytest(*INNER)
    result.assert_outcomes(passed=1)


def test_the_simulator_is_closed_after_the_test(pytester: pytest.Pytester) -> None:
    pytester.makeini(ASYNCIO_INI.format(mode="auto"))
    pytester.makepyfile(
        test_closed="""
        import aiohttp
        import pytest

        seen = []

        async def test_one(moa_sim):
            seen.append(moa_sim)

        async def test_after():
            (sim,) = seen
            async with aiohttp.ClientSession() as s:
                with pytest.raises(aiohttp.ClientConnectionError):
                    await s.get(sim.base_url + "/models")
        """
    )
    result = pytester.runpytest(*INNER)
    result.assert_outcomes(passed=2)


def test_a_stream_left_open_fails_the_test(pytester: pytest.Pytester) -> None:
    pytester.makeini(ASYNCIO_INI.format(mode="auto"))
    pytester.makepyfile(
        test_leak="""
        from moa_stream.testing import Script

        async def test_leaks(scripted_provider):
            provider = scripted_provider({"m": Script()}, name="leaky")
            from moa_stream import ChatRequest
            stream = provider.stream(ChatRequest(messages=[], model="m"))
            await stream.__anext__()  # opened, never closed
        """
    )
    result = pytester.runpytest(*INNER)
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*streams left open at the end of the test: leaky: 1*"])


def test_bad_marker_arguments_are_clear_errors(pytester: pytest.Pytester) -> None:
    pytester.makeini(ASYNCIO_INI.format(mode="auto"))
    pytester.makepyfile(
        test_bad="""
        import pytest

        @pytest.mark.moa_sim("no-such-profile")
        async def test_profile(moa_sim):
            pass

        @pytest.mark.moa_sim("medium", faults={"other": {"rate_limit": 1.0}})
        async def test_faults(moa_sim):
            pass
        """
    )
    result = pytester.runpytest(*INNER)
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(
        [
            "*unknown latency profile 'no-such-profile'; known: *",
            "*faults for 'other', which is not a model of the simulator*",
        ]
    )


def test_marker_is_registered(pytester: pytest.Pytester) -> None:
    """``--markers`` documents the marker (so ``--strict-markers`` accepts it)."""
    pytester.makeini(ASYNCIO_INI.format(mode="auto"))
    result = pytester.runpytest("--markers", *INNER)
    result.stdout.fnmatch_lines(["@pytest.mark.moa_sim(*models, seed=0, speed=1.0, faults=None)*"])


def test_sim_models_builds_what_the_marker_says() -> None:
    from moa_stream.pytest_plugin import sim_models

    flaky = SimModel("flaky")
    built = sim_models("medium", flaky, speed=0.5, faults={"flaky": FaultProfile(reset_mid=1.0)})
    assert [m.name for m in built] == ["medium", "flaky"]
    assert built[0].latency == PROFILES["medium"].scaled(0.5)
    assert built[1].faults.reset_mid == 1.0
    with pytest.raises(ValueError, match="speed must be > 0"):
        sim_models(speed=0)
    with pytest.raises(TypeError, match="SimModel or a profile name"):
        sim_models(3)  # type: ignore[arg-type]
