"""pytest fixtures for testing code that uses moa_stream, the way moa_stream tests itself.

Installed with the package and loaded by pytest through the ``pytest11`` entry point (disable
it with ``-p no:moa_stream.pytest_plugin``). The entry point is the module
:mod:`moa_stream.pytest_plugin`, which re-exports this one, and is named after it, so a
``conftest.py`` that also lists it in ``pytest_plugins`` loads it once, not twice.

- ``moa_sim``: a started :class:`~moa_stream.sim.SimServer` (a real OpenAI-compatible HTTP
  server) on a free loopback port, closed after the test. Choose its models with the
  ``moa_sim`` marker::

      @pytest.mark.moa_sim("small-fast", SimModel("flaky", faults=FaultProfile(reset_mid=0.5)),
                           seed=7, speed=0.1)
      async def test_my_app(moa_sim):
          provider = OpenAIProvider(moa_sim.base_url)

  A string is a latency profile of :data:`moa_stream.sim.PROFILES` (the model is named after
  it), scaled by ``speed`` (0.1: ten times faster); ``faults`` maps model names to a
  :class:`~moa_stream.sim.FaultProfile` (or its fields as a dict). Without the marker: the
  models ``fast`` (first token after 10 ms) and ``slow`` (after 200 ms), 1000 tokens/s.
- ``scripted_provider``: makes :class:`~moa_stream.testing.ScriptedProvider` objects
  (``scripted_provider(m=Script(ttft=0.1))``) and fails the test if one of their streams was
  left open at its end.

``moa_sim`` is an async fixture and needs pytest-asyncio (its ``auto`` or ``strict`` mode).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import replace
from typing import Any

import pytest

from moa_stream.sim import PROFILES, FaultProfile, LatencyProfile, SimModel, SimServer
from moa_stream.testing import Script, ScriptedProvider

try:
    import pytest_asyncio
except ImportError:  # pragma: no cover - exercised without pytest-asyncio only
    pytest_asyncio = None  # type: ignore[assignment]

__all__ = ["DEFAULT_SIM_MODELS", "moa_sim", "scripted_provider", "sim_models"]

#: The models of ``moa_sim`` when the test has no ``moa_sim`` marker.
DEFAULT_SIM_MODELS: tuple[SimModel, ...] = (
    SimModel("fast", latency=LatencyProfile.fixed(ttft=0.01, tokens_per_s=1000.0)),
    SimModel("slow", latency=LatencyProfile.fixed(ttft=0.2, tokens_per_s=1000.0)),
)

_MARKER_HELP = (
    "moa_sim(*models, seed=0, speed=1.0, faults=None): the models of the moa_sim fixture; "
    "a model is a SimModel or the name of a moa_stream.sim.PROFILES latency profile"
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", _MARKER_HELP)


def sim_models(
    *models: SimModel | str,
    speed: float = 1.0,
    faults: Mapping[str, FaultProfile | Mapping[str, Any]] | None = None,
) -> list[SimModel]:
    """The models a ``moa_sim`` marker describes (see the module docstring)."""
    if speed <= 0:
        raise ValueError(f"speed must be > 0, got {speed!r}")
    built: list[SimModel] = []
    for model in models or DEFAULT_SIM_MODELS:
        if isinstance(model, str):
            if model not in PROFILES:
                known = ", ".join(sorted(PROFILES))
                raise ValueError(f"unknown latency profile {model!r}; known: {known}")
            model = SimModel(model, latency=PROFILES[model])
        elif not isinstance(model, SimModel):
            raise TypeError(f"a moa_sim model is a SimModel or a profile name, got {model!r}")
        if speed != 1.0:
            model = replace(model, latency=model.latency.scaled(speed))
        built.append(model)
    names = {m.name for m in built}
    for name, fault in (faults or {}).items():
        if name not in names:
            raise ValueError(f"faults for {name!r}, which is not a model of the simulator")
        profile = fault if isinstance(fault, FaultProfile) else FaultProfile(**fault)
        built = [replace(m, faults=profile) if m.name == name else m for m in built]
    return built


async def _serve_sim(request: pytest.FixtureRequest) -> AsyncIterator[SimServer]:
    marker = request.node.get_closest_marker("moa_sim")
    args: tuple[Any, ...] = marker.args if marker is not None else ()
    kwargs: dict[str, Any] = dict(marker.kwargs) if marker is not None else {}
    seed = kwargs.pop("seed", 0)
    models = sim_models(*args, **kwargs)
    async with SimServer(models=models, seed=seed, host="127.0.0.1", port=0) as sim:
        yield sim


if pytest_asyncio is not None:
    moa_sim = pytest_asyncio.fixture(_serve_sim, name="moa_sim")
else:  # pragma: no cover - exercised without pytest-asyncio only

    @pytest.fixture(name="moa_sim")
    def moa_sim() -> None:
        pytest.fail("the moa_sim fixture needs pytest-asyncio: pip install pytest-asyncio")


@pytest.fixture(name="scripted_provider")
def scripted_provider() -> Iterator[Callable[..., ScriptedProvider]]:
    """Make scripted providers: ``scripted_provider({"model": Script(...)}, name=...)`` or
    ``scripted_provider(model=Script(...))``. A stream left open at the end fails the test."""
    made: list[ScriptedProvider] = []

    def make(
        scripts: Mapping[str, Script] | None = None,
        /,
        *,
        name: str = "scripted",
        **by_model: Script,
    ) -> ScriptedProvider:
        provider = ScriptedProvider({**(scripts or {}), **by_model}, name=name)
        made.append(provider)
        return provider

    yield make
    leaked = [f"{p.name}: {p.open_streams}" for p in made if p.open_streams]
    if leaked:
        pytest.fail(f"streams left open at the end of the test: {', '.join(leaked)}")
