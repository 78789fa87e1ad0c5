"""A MoA over OpenAI-compatible endpoints that owns its providers: the pieces of
:meth:`MoA.from_endpoints <moa_stream.engine.spec.MoA.from_endpoints>`.

:class:`Endpoint` names one model at one endpoint; :class:`EndpointProviders` makes one
:class:`~moa_stream.OpenAIProvider` per distinct endpoint (URL and key), so that models served
together share a connection pool; :class:`EndpointMoA` is the MoA together with those
providers, closed when its ``async with`` block ends. ``MoA.from_endpoints`` assembles them;
``moa_stream.from_endpoints`` (:mod:`moa_stream._easy`) is the same call.

This module needs the MoA classes for their types only, so the spec module can build with it
without the two importing each other.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from moa_stream._exceptions import ConfigError
from moa_stream._resource import AsyncResource
from moa_stream._types import ChatMessage
from moa_stream.engine.policies import Policy, parse_policy
from moa_stream.engine.run import MoARun, RunResult
from moa_stream.providers import OpenAIProvider, RetryPolicy, Timeouts

if TYPE_CHECKING:
    from moa_stream.engine.spec import Agent, MoA

__all__ = ["Endpoint", "EndpointMoA", "EndpointProviders", "as_policy", "unique_names"]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One model at one OpenAI-compatible endpoint.

    ``base_url``, ``api_key`` and ``api_key_env`` default to those given to
    :func:`~moa_stream.from_endpoints`; ``name`` (the agent's name in events and reports)
    defaults to the model. ``params`` are the :class:`~moa_stream.Agent` sampling fields
    (``temperature``, ``max_tokens``, ``system_prompt``, ``extra``).
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


@dataclass(kw_only=True, eq=False)
class EndpointProviders:
    """The providers of a MoA over endpoints: one :class:`~moa_stream.OpenAIProvider` per
    distinct URL, key and key variable, made when an endpoint first needs it.

    ``base_url``, ``api_key`` and ``api_key_env`` are the defaults of endpoints that do not set
    their own; ``timeouts`` and ``retry`` apply to every provider. A provider opens its
    connection pool on first use: nothing needs closing if building the MoA fails.
    """

    base_url: str | None = None
    api_key: str | None = field(default=None, repr=False)
    api_key_env: str | None = None
    timeouts: Timeouts | None = None
    retry: RetryPolicy | None = None
    _made: dict[tuple[str, str | None, str | None], OpenAIProvider] = field(
        default_factory=dict, init=False, repr=False
    )

    def provider_for(self, endpoint: Endpoint, role: str) -> OpenAIProvider:
        """The provider serving ``endpoint``; ``role`` names it in a :class:`ConfigError`."""
        url = endpoint.base_url or self.base_url
        if url is None:
            raise ConfigError(
                f"no base_url for model {endpoint.model!r}: pass base_url= or an Endpoint with one",
                path=role,
            )
        key = (url, endpoint.api_key or self.api_key, endpoint.api_key_env or self.api_key_env)
        if key not in self._made:
            self._made[key] = OpenAIProvider(
                url,
                name=f"endpoint-{len(self._made) + 1}",
                api_key=key[1],
                api_key_env=key[2],
                timeouts=self.timeouts,
                retry=self.retry,
            )
        return self._made[key]

    @property
    def providers(self) -> list[OpenAIProvider]:
        """Every provider made so far, in the order they were made."""
        return list(self._made.values())


def unique_names(agents: tuple[Agent, ...]) -> tuple[Agent, ...]:
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
