"""The short way to a MoA: endpoints in, an object that owns its providers out.

::

    async with moa_stream.MoA.from_endpoints(
        ["small-fast", "medium", "large-slow"], "aggregator", base_url="http://127.0.0.1:8001/v1"
    ) as m:
        async for text in m.text(messages, policy="quorum(2)"):
            print(text, end="")

:func:`from_endpoints` builds one :class:`~moa_stream.OpenAIProvider` per distinct endpoint,
an :class:`~moa_stream.Agent` per model and the :class:`~moa_stream.MoA`; the returned
:class:`EndpointMoA` closes the providers (and any run still open) when its ``async with``
block ends. The explicit forms (providers, ``Agent``, :func:`~moa_stream.mixture_of_agents`,
``spec.stream()``) stay available for everything this does not cover.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from moa_stream._exceptions import ConfigError
from moa_stream._resource import AsyncResource
from moa_stream._types import ChatMessage
from moa_stream.engine.policies import Policy, WaitAll, parse_policy
from moa_stream.engine.run import MoARun, RunResult
from moa_stream.engine.spec import Agent, Layer, MoA
from moa_stream.providers import OpenAIProvider, RetryPolicy, Timeouts

__all__ = ["Endpoint", "EndpointMoA", "as_policy", "from_endpoints"]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One model at one OpenAI-compatible endpoint.

    ``base_url``, ``api_key`` and ``api_key_env`` default to those given to
    :func:`from_endpoints`; ``name`` (the agent's name in events and reports) defaults to the
    model. ``params`` are the :class:`~moa_stream.Agent` sampling fields (``temperature``,
    ``max_tokens``, ``system_prompt``, ``extra``).
    """

    model: str
    base_url: str | None = None
    api_key: str | None = field(default=None, repr=False)
    api_key_env: str | None = None
    name: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict)


def as_policy(policy: Policy | str | None) -> Policy | None:
    """A :class:`~moa_stream.Policy` from one or from the policy language
    (``"quorum(2) | deadline(1.5)"``, as in a config file); ``None`` stays ``None``."""
    if policy is None or isinstance(policy, Policy):
        return policy
    try:
        return parse_policy(policy)
    except (ConfigError, ValueError) as exc:
        raise ConfigError(f"{exc} in {policy!r}", path="policy") from None


class EndpointMoA(AsyncResource):
    """A :class:`~moa_stream.MoA` together with the providers it owns.

    Use it as an async context manager: leaving the block closes every run still open, then
    every provider. :meth:`text`, :meth:`final` and :meth:`stream` take an optional ``policy``
    (a :class:`~moa_stream.Policy` or its text) that replaces the layers' policy for one run.
    """

    def __init__(self, spec: MoA, providers: Sequence[OpenAIProvider]) -> None:
        self.spec = spec
        self.providers = tuple(providers)
        self._runs: set[MoARun] = set()
        self._closed = False

    def _spec_for(self, policy: Policy | str | None) -> MoA:
        chosen = as_policy(policy)
        if chosen is None:
            return self.spec
        if not self.spec.layers:
            raise ConfigError("a single model has no proposers, so no policy", path="policy")
        return self.spec.with_policy(chosen)

    def stream(
        self,
        messages: Sequence[ChatMessage],
        *,
        policy: Policy | str | None = None,
        **options: Any,
    ) -> MoARun:
        """A run, as :meth:`MoA.stream <moa_stream.MoA.stream>`: use it in ``async with``."""
        if self._closed:
            raise RuntimeError("this MoA's providers are closed")
        run = self._spec_for(policy).stream(messages, **options)
        self._runs.add(run)
        return run

    async def text(
        self,
        messages: Sequence[ChatMessage],
        *,
        policy: Policy | str | None = None,
        **options: Any,
    ) -> AsyncIterator[str]:
        """The answer's text pieces as they arrive. The run is closed in this generator's
        ``finally``: at the end, on an error, or when the generator is closed. Breaking out of
        the loop early closes it when the generator is collected; wrap it in
        ``contextlib.aclosing()`` to close it at once."""
        run = self.stream(messages, policy=policy, **options)
        try:
            async with run:
                async for piece in run.text():
                    yield piece
        finally:
            self._runs.discard(run)

    async def final(
        self,
        messages: Sequence[ChatMessage],
        *,
        policy: Policy | str | None = None,
        **options: Any,
    ) -> RunResult:
        """Run to the end: the whole answer and the report."""
        run = self.stream(messages, policy=policy, **options)
        try:
            async with run:
                return await run.final()
        finally:
            self._runs.discard(run)

    async def aclose(self) -> None:
        """Close every run still open, then every provider. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for run in list(self._runs):
            await run.aclose()
        self._runs.clear()
        for provider in self.providers:
            with contextlib.suppress(Exception):
                await provider.aclose()


def from_endpoints(
    proposers: Sequence[str | Endpoint],
    aggregator: str | Endpoint,
    *,
    base_url: str | None = None,
    api_key: str | None = None,
    api_key_env: str | None = None,
    policy: Policy | str | None = None,
    fallbacks: Sequence[str | Endpoint] = (),
    layers: int = 1,
    stragglers: Literal["cancel", "keep"] = "cancel",
    timeouts: Timeouts | None = None,
    retry: RetryPolicy | None = None,
    temperature: float | None = None,
    name: str = "moa",
) -> EndpointMoA:
    """A MoA over OpenAI-compatible endpoints that owns (and closes) its providers.

    Each proposer, the aggregator and each fallback is a model name (served at ``base_url``)
    or an :class:`Endpoint` (its own URL and key). Endpoints with the same URL and key share
    one provider, so one connection pool. ``policy`` is the layers' policy, an object or its
    text (default: wait for every proposer); ``temperature`` applies to every agent that
    does not set its own.
    """
    if layers < 1:
        raise ConfigError("must be at least 1", path="layers")
    if not proposers:
        raise ConfigError("at least one proposer is needed", path="proposers")
    providers: dict[tuple[str, str | None, str | None], OpenAIProvider] = {}

    def agent_for(item: str | Endpoint, role: str) -> Agent:
        ep = item if isinstance(item, Endpoint) else Endpoint(item)
        url = ep.base_url or base_url
        if url is None:
            raise ConfigError(
                f"no base_url for model {ep.model!r}: pass base_url= or an Endpoint with one",
                path=role,
            )
        key = (url, ep.api_key or api_key, ep.api_key_env or api_key_env)
        if key not in providers:
            providers[key] = OpenAIProvider(
                url,
                name=f"endpoint-{len(providers) + 1}",
                api_key=key[1],
                api_key_env=key[2],
                timeouts=timeouts,
                retry=retry,
            )
        params: dict[str, Any] = dict(ep.params)
        if temperature is not None:
            params.setdefault("temperature", temperature)
        return Agent(ep.name or ep.model, providers[key], ep.model, **params)

    # Providers open their connection pool on first use: nothing to close if this raises.
    proposer_agents = tuple(agent_for(p, "proposers") for p in proposers)
    aggregator_agent = agent_for(aggregator, "aggregator")
    fallback_agents = tuple(agent_for(f, "fallbacks") for f in fallbacks)
    layer = Layer(
        _unique_names(proposer_agents), as_policy(policy) or WaitAll(), stragglers=stragglers
    )
    spec = MoA(
        layers=(layer,) * layers,
        aggregator=aggregator_agent,
        fallbacks=fallback_agents,
        name=name,
    )
    return EndpointMoA(spec, list(providers.values()))


def _unique_names(agents: tuple[Agent, ...]) -> tuple[Agent, ...]:
    """The same model asked twice (a self-MoA by hand) gets ``#2``, ``#3`` to its name, and a
    seed of its own so that deterministic servers still answer differently."""
    seen: dict[str, int] = {}
    out = []
    for agent in agents:
        count = seen.get(agent.name, 0) + 1
        seen[agent.name] = count
        if count > 1:
            agent = replace(
                agent, name=f"{agent.name}#{count}", extra={**agent.extra, "seed": count}
            )
        out.append(agent)
    return tuple(out)
