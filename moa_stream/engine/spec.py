"""The immutable description of a Mixture-of-Agents.

A :class:`MoA` is layers of proposers, then a final aggregator (with ordered fallbacks) that
streams the answer. Layer 0 answers the user; each later layer answers again with the previous
layer's answers as references; the aggregator synthesizes the last layer's answers. A MoA with
no layers is a single model (the baseline).

Build one with the presets (:func:`single`, :func:`moa`, :func:`moa_lite`, :func:`self_moa`) or
the dataclasses directly, or load it from TOML (:mod:`moa_stream.config`). It holds providers
but owns none of them: close providers yourself (or use a :class:`moa_stream.config.Runtime`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

from moa_stream._exceptions import ConfigError
from moa_stream._types import ChatMessage, ChatRequest
from moa_stream.engine.endpoints import (
    Endpoint,
    EndpointMoA,
    EndpointProviders,
    as_policy,
    unique_names,
)
from moa_stream.engine.layer import UsableAnswer
from moa_stream.engine.policies import Policy, WaitAll, parse_policy, required_completions
from moa_stream.engine.prompts import PromptTemplates
from moa_stream.engine.run import MoARun
from moa_stream.engine.similarity import Similarity, conclusion_match
from moa_stream.engine.staircase import Staircase
from moa_stream.engine.streams import Hedge

if TYPE_CHECKING:
    from moa_stream.providers import Provider, RetryPolicy, Timeouts

__all__ = [
    "Agent",
    "Layer",
    "LayerCut",
    "Hedge",
    "MoA",
    "UsableAnswer",
    "moa",
    "moa_lite",
    "self_moa",
    "single",
]


@dataclass(frozen=True, slots=True)
class Agent:
    """One model behind one provider, with its sampling parameters.

    ``extra`` is merged into the request body as it is (``top_p``, ``seed``, vendor fields).
    ``first_token_timeout`` and ``timeout`` bound this agent's requests (seconds to the first
    content token, and in all), on top of its provider's own timeouts: a slow agent fails
    like any upstream error, and its layer's policy decides what that means. ``hedge`` sends a
    second copy of a request that is slow to start (:class:`~moa_stream.engine.streams.Hedge`).
    """

    name: str
    provider: Provider = field(repr=False)
    model: str
    temperature: float | None = None
    max_tokens: int | None = None
    system_prompt: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    first_token_timeout: float | None = None
    timeout: float | None = None
    hedge: Hedge | None = None

    def __post_init__(self) -> None:
        for name in ("first_token_timeout", "timeout"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"Agent({name}) must be > 0")

    @classmethod
    def of(cls, provider: Provider, model: str, *, name: str | None = None, **params: Any) -> Agent:
        """An agent named after its model unless ``name`` is given: ``Agent.of(local, "qwen")``."""
        return cls(name or model, provider, model, **params)

    def request(
        self,
        messages: Sequence[ChatMessage],
        *,
        temperature: float | None = None,
        max_tokens: int | None = None,
        stop: tuple[str, ...] | None = None,
    ) -> ChatRequest:
        """A request for ``messages``; arguments given here override the agent's own."""
        return ChatRequest(
            messages=messages,
            model=self.model,
            temperature=self.temperature if temperature is None else temperature,
            max_tokens=self.max_tokens if max_tokens is None else max_tokens,
            stop=stop,
            extra=self.extra,
        )


@dataclass(frozen=True, slots=True)
class Layer:
    """Proposers that run at once, and the policy that decides when to stop waiting.

    ``stragglers``: what happens to proposers still running when the policy fires: ``cancel``
    (their requests are closed at once) or ``keep`` (they finish for accounting, nobody waits
    for them). ``on_unmet``: when the policy can no longer fire (too many failures), ``degrade``
    (wait for what can still be met: the same rule with ``k`` lowered to the proposers still
    running, then go on with what completed; the layer is reported ``degraded``) or ``raise``
    (:class:`moa_stream.LayerFailedError`). ``usable``: what a finished answer needs to count
    as complete (by default: not empty, finish reason ``stop``). ``max_tokens`` caps every
    proposer's answer in this layer (over each agent's own ``max_tokens``).

    A policy that asks for more proposers than the layer has is rejected here
    (:class:`moa_stream.ConfigError`), as is any other invalid setting.
    """

    agents: tuple[Agent, ...]
    policy: Policy = field(default_factory=WaitAll)
    stragglers: Literal["cancel", "keep"] = "cancel"
    on_unmet: Literal["degrade", "raise"] = "degrade"
    usable: UsableAnswer = field(default_factory=UsableAnswer)
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ConfigError("Layer(max_tokens) must be >= 1")
        if not self.agents:
            raise ConfigError("a layer needs at least one agent")
        names = [a.name for a in self.agents]
        if len(set(names)) != len(names):
            raise ConfigError(f"agent names must be unique within a layer: {names}")
        needed = required_completions(self.policy)
        if needed > len(self.agents):
            raise ConfigError(
                f"policy {self.policy!r} asks for {needed} proposers; the layer has "
                f"{len(self.agents)}"
            )
        if self.stragglers not in ("cancel", "keep"):
            raise ConfigError(f"stragglers must be 'cancel' or 'keep', not {self.stragglers!r}")
        if self.on_unmet not in ("degrade", "raise"):
            raise ConfigError(f"on_unmet must be 'degrade' or 'raise', not {self.on_unmet!r}")


@dataclass(frozen=True, slots=True)
class LayerCut:
    """When to skip the remaining refinement layers and go straight to the aggregator.

    ``agreement``: cut when the mean pairwise ``similarity`` of a layer's complete answers is at
    least this (``None``: never); the default measure compares the answers' conclusions (see
    :mod:`moa_stream.engine.similarity` for its limits). ``ttft_budget``: cut when running one
    more layer would, by the previous layer's duration, put the aggregator's start past this
    many seconds after the run started (``None``: no budget).
    """

    agreement: float | None = None
    similarity: Similarity = field(default=conclusion_match, repr=False)
    ttft_budget: float | None = None

    def __post_init__(self) -> None:
        if self.agreement is not None and not 0.0 <= self.agreement <= 1.0:
            raise ConfigError("LayerCut(agreement) must be between 0 and 1")
        if self.ttft_budget is not None and not self.ttft_budget >= 0:
            raise ConfigError("LayerCut(ttft_budget) must be >= 0")


@dataclass(frozen=True, slots=True)
class MoA:
    """A Mixture-of-Agents. See the module docstring; start a run with :meth:`stream`."""

    layers: tuple[Layer, ...]
    aggregator: Agent
    fallbacks: tuple[Agent, ...] = ()
    cut: LayerCut = field(default_factory=LayerCut)
    templates: PromptTemplates = field(default_factory=PromptTemplates)
    max_reference_chars: int | None = None
    prewarm: bool = True
    name: str = "moa"
    #: A staircase aggregator (:mod:`moa_stream.engine.staircase`): the last layer's policy is
    #: its start rule. ``None``: the aggregator is asked once.
    staircase: Staircase | None = None

    def stream(
        self,
        messages: Sequence[ChatMessage],
        *,
        temperature: float | None = None,
        max_tokens: int | None = None,
        stop: Sequence[str] | None = None,
        policy: Policy | str | None = None,
        keep_grace: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> MoARun:
        """Start a run: ``async with moa.stream(messages) as run: async for text in run.text()``.

        ``temperature``, ``max_tokens`` and ``stop`` are the *answer's* parameters, as in an
        OpenAI request: they apply to the aggregator (or the single model) and its fallbacks,
        never to proposers, whose answers are intermediate (bound those with each agent's
        settings and :attr:`Layer.max_tokens`). ``policy`` replaces every layer's policy for
        this run only (a :class:`Policy` or its text, ``"quorum(2) | deadline(1.5)"``), checked
        as when the MoA is built. ``keep_grace``: how long closing the run waits, after
        ``run.done``, for proposers of ``keep`` layers to finish (for their accounting) before
        cancelling them. Leaving before ``run.done`` never waits: everything still running is
        cancelled at once.
        """
        if not keep_grace >= 0:
            raise ConfigError("keep_grace must be >= 0")
        spec = self
        if policy is not None:
            spec = self.with_policy(parse_policy(policy) if isinstance(policy, str) else policy)
        return MoARun(
            spec,
            list(messages),
            temperature=temperature,
            max_tokens=max_tokens,
            stop=tuple(stop) if stop else None,
            clock=clock,
            keep_grace=keep_grace,
        )

    @classmethod
    def from_endpoints(
        cls,
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

        Each proposer, the aggregator and each fallback is a model name (served at
        ``base_url``) or an :class:`~moa_stream.Endpoint` (its own URL and key). Endpoints with
        the same URL and key share one provider, so one connection pool. ``policy`` is the
        layers' policy, an object or its text (default: wait for every proposer);
        ``temperature`` applies to every agent that does not set its own. Also available as
        ``moa_stream.from_endpoints``; the pieces are in :mod:`moa_stream.engine.endpoints`.
        """
        if layers < 1:
            raise ConfigError("must be at least 1", path="layers")
        if not proposers:
            raise ConfigError("at least one proposer is needed", path="proposers")
        pool = EndpointProviders(
            base_url=base_url,
            api_key=api_key,
            api_key_env=api_key_env,
            timeouts=timeouts,
            retry=retry,
        )

        def agent_for(item: str | Endpoint, role: str) -> Agent:
            endpoint = item if isinstance(item, Endpoint) else Endpoint(item)
            params: dict[str, Any] = dict(endpoint.params)
            if temperature is not None:
                params.setdefault("temperature", temperature)
            provider = pool.provider_for(endpoint, role)
            return Agent(endpoint.name or endpoint.model, provider, endpoint.model, **params)

        proposer_agents = unique_names(tuple(agent_for(p, "proposers") for p in proposers))
        aggregator_agent = agent_for(aggregator, "aggregator")
        fallback_agents = tuple(agent_for(f, "fallbacks") for f in fallbacks)
        layer = Layer(proposer_agents, as_policy(policy) or WaitAll(), stragglers=stragglers)
        spec = cls(
            layers=(layer,) * layers,
            aggregator=aggregator_agent,
            fallbacks=fallback_agents,
            name=name,
        )
        return EndpointMoA(spec, pool.providers)

    def with_policy(self, policy: Policy, **layer_changes: Any) -> MoA:
        """The same MoA with ``policy`` (and any other :class:`Layer` field) on every layer."""
        layers = tuple(replace(layer, policy=policy, **layer_changes) for layer in self.layers)
        return replace(self, layers=layers)

    @property
    def agents(self) -> tuple[Agent, ...]:
        """Every agent, each once: proposers layer by layer, then aggregators."""
        seen: dict[str, Agent] = {}
        for layer in self.layers:
            for a in layer.agents:
                seen.setdefault(a.name, a)
        for a in (self.aggregator, *self.fallbacks):
            seen.setdefault(a.name, a)
        return tuple(seen.values())


def single(agent: Agent, *, fallbacks: Sequence[Agent] = (), name: str = "single") -> MoA:
    """One model, no proposers: the baseline every MoA is measured against."""
    return MoA(layers=(), aggregator=agent, fallbacks=tuple(fallbacks), name=name)


def moa(
    proposers: Sequence[Agent],
    aggregator: Agent,
    *,
    layers: int = 1,
    policy: Policy | None = None,
    fallbacks: Sequence[Agent] = (),
    stragglers: Literal["cancel", "keep"] = "cancel",
    on_unmet: Literal["degrade", "raise"] = "degrade",
    cut: LayerCut | None = None,
    max_reference_chars: int | None = None,
    name: str = "moa",
    staircase: Staircase | None = None,
) -> MoA:
    """The paper's layout: ``layers`` layers of the same proposers, then ``aggregator``.

    ``layers=1`` is proposers then aggregator; each extra layer is one refinement round.
    With ``staircase``, the aggregator starts when ``policy`` fires and is asked again, step
    by step, as the last layer's proposers write on.
    """
    if layers < 1:
        raise ConfigError("moa() needs layers >= 1; use single() for no proposers")
    layer = Layer(tuple(proposers), policy or WaitAll(), stragglers=stragglers, on_unmet=on_unmet)
    return MoA(
        layers=(layer,) * layers,
        aggregator=aggregator,
        fallbacks=tuple(fallbacks),
        cut=cut or LayerCut(),
        max_reference_chars=max_reference_chars,
        name=name,
        staircase=staircase,
    )


def moa_lite(
    proposers: Sequence[Agent],
    aggregator: Agent,
    *,
    policy: Policy | None = None,
    fallbacks: Sequence[Agent] = (),
    max_reference_chars: int | None = 4000,
    name: str = "moa-lite",
) -> MoA:
    """One proposer layer, then the aggregator, with references capped in length: the cheaper
    variant of the paper."""
    return moa(
        proposers,
        aggregator,
        layers=1,
        policy=policy,
        fallbacks=fallbacks,
        max_reference_chars=max_reference_chars,
        name=name,
    )


def self_moa(
    agent: Agent,
    n: int,
    *,
    aggregator: Agent | None = None,
    policy: Policy | None = None,
    temperature: float = 0.7,
    name: str = "self-moa",
) -> MoA:
    """``n`` samples of one model, aggregated (by the same model unless ``aggregator`` is given).

    The samples are ``n`` separate requests (many servers refuse or ignore ``n > 1``), each with
    its own ``seed`` so that deterministic servers still give different samples.
    """
    if n < 1:
        raise ConfigError("self_moa() needs n >= 1")
    samples = tuple(
        replace(
            agent,
            name=f"{agent.name}#{i + 1}",
            temperature=agent.temperature if agent.temperature is not None else temperature,
            extra={**agent.extra, "seed": int(agent.extra.get("seed", 0)) + i + 1},
        )
        for i in range(n)
    )
    return MoA(
        layers=(Layer(samples, policy or WaitAll()),),
        aggregator=aggregator or agent,
        name=name,
    )
