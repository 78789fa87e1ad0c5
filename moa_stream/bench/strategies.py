"""Strategies: the ways of answering a prompt that the benchmark compares.

A :class:`Strategy` turns a :class:`Lineup` (the live agents of one scenario) into something
runnable: a :class:`~moa_stream.engine.MoA` for the engine, or a
:class:`~moa_stream.bench.baseline.ReferenceMoA` for the original, non-streaming method. It
returns ``None`` where it does not apply (``quorum-3`` with three proposers).

Adding a policy to the comparison is one entry in :data:`STRATEGIES` (or, from the command line,
``--strategy "policy:quorum(2) | deadline(1.0)"`` for any policy the engine parses). Policies
with times in them are written for the simulator's real-time profiles and scaled with
:attr:`Lineup.time_scale`, so a scenario run faster keeps the same shape.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from types import MappingProxyType

from moa_stream.bench.baseline import ChatAPI, ReferenceMoA
from moa_stream.engine.policies import Deadline, Partial, Policy, Quorum, parse_policy
from moa_stream.engine.similarity import final_line_match
from moa_stream.engine.spec import Agent, Layer, LayerCut, MoA, moa, self_moa, single
from moa_stream.engine.staircase import Continuation, Staircase, StepLayout
from moa_stream.engine.streams import Hedge

__all__ = [
    "Lineup",
    "Runnable",
    "STRATEGIES",
    "Strategy",
    "get_strategies",
    "hedged_strategy",
    "policy_strategy",
    "staircase_strategy",
]

#: What a strategy produces for one scenario.
Runnable = MoA | ReferenceMoA


@dataclass(frozen=True, slots=True)
class Lineup:
    """The live agents of one scenario: ``proposers`` (each layer), ``aggregator``, ``best``
    (the single best model), the number of ``layers``, each agent's :class:`ChatAPI` by name,
    and the factor the scenario's delays were scaled by."""

    proposers: tuple[Agent, ...]
    aggregator: Agent
    best: Agent
    layers: int = 1
    endpoints: MappingProxyType[str, ChatAPI] = field(default_factory=lambda: MappingProxyType({}))
    time_scale: float = 1.0


@dataclass(frozen=True, slots=True)
class Strategy:
    """A named way of answering; ``make`` builds it for a lineup (``None``: not applicable,
    and ``needs`` says what it needs, for the message that says why it was skipped)."""

    name: str
    description: str
    make: Callable[[Lineup], Runnable | None] = field(repr=False)
    needs: str = ""


def policy_strategy(
    name: str,
    policy: str | Callable[[float], Policy],
    description: str,
    *,
    cut: LayerCut | None = None,
    min_proposers: int = 1,
    min_layers: int = 1,
) -> Strategy:
    """A strategy that runs the lineup as a streamed MoA with ``policy`` on every layer.

    ``policy`` is the policy language (``"quorum(2)"``) or a function of the lineup's time scale
    (for policies with times in them). ``min_proposers``, ``min_layers``: skip lineups with
    fewer proposers or layers.
    """

    def make(lineup: Lineup) -> MoA | None:
        if len(lineup.proposers) < min_proposers or lineup.layers < min_layers:
            return None
        chosen = parse_policy(policy) if isinstance(policy, str) else policy(lineup.time_scale)
        return moa(
            lineup.proposers,
            lineup.aggregator,
            layers=lineup.layers,
            policy=chosen,
            cut=cut,
            name=name,
        )

    needs = [
        f"at least {n} {what}"
        for n, what in ((min_proposers, "proposers"), (min_layers, "layers"))
        if n > 1
    ]
    return Strategy(name, description, make, " and ".join(needs))


_PREFILL = Continuation("prefill", "vllm")
_TURNS = Continuation("turns")


def staircase_strategy(
    name: str,
    start: Callable[[float], Policy],
    description: str,
    *,
    steps: tuple[int, ...] = (8, 16, 32, 64, 128),
    lead: int | None = 32,
    continuation: Continuation = _TURNS,
    max_pause: float | None = None,
    layout: StepLayout = "updates",
) -> Strategy:
    """A staircase aggregator starting when ``start`` (a function of the lineup's time scale)
    fires on the last layer; earlier layers, if any, wait for a quorum of two."""

    def make(lineup: Lineup) -> MoA:
        spec = moa(
            lineup.proposers,
            lineup.aggregator,
            layers=lineup.layers,
            policy=start(lineup.time_scale),
            name=name,
            # The pause bound is a time like the policies': it scales with the lineup.
            staircase=Staircase(
                steps=steps,
                lead=lead,
                default=continuation,
                max_pause=(max_pause or Staircase().max_pause) * lineup.time_scale,
                layout=layout,
            ),
        )
        if lineup.layers == 1:
            return spec
        earlier = Layer(tuple(lineup.proposers), Quorum(2))
        return replace(spec, layers=(*(earlier,) * (lineup.layers - 1), spec.layers[-1]))

    return Strategy(name, description, make)


def _start(scale: float) -> Policy:
    return Partial(2, min_tokens=8) | Deadline(0.5 * scale, min_k=1, partial=True)


def _single(lineup: Lineup) -> MoA:
    return single(lineup.best, name="single")


def _reference(lineup: Lineup) -> ReferenceMoA:
    return ReferenceMoA(lineup.proposers, lineup.aggregator, layers=lineup.layers)


def _self_moa(lineup: Lineup) -> MoA:
    spec = self_moa(lineup.best, 4, policy=Quorum(3))
    # Every layer of the lineup, so a two-layer scenario refines the samples too.
    return replace(spec, layers=spec.layers * lineup.layers)


_BUILT_IN = (
    Strategy("single", "the single best model alone (no proposers)", _single),
    Strategy(
        "reference-moa",
        "the original MoA: proposers not streamed (one JSON response each), wait for all, "
        "then the streamed aggregator",
        _reference,
    ),
    policy_strategy("wait-all", "wait_all", "streamed proposers, wait for every one"),
    *(
        policy_strategy(
            f"quorum-{k}",
            f"quorum({k})",
            f"start the aggregator when {k} proposer{'s' if k > 1 else ''} finished",
            min_proposers=k + 1,
        )
        for k in (1, 2, 3)
    ),
    policy_strategy(
        "deadline",
        lambda scale: Deadline(2.0 * scale, min_k=2),
        "at 2 s, go on with the finished proposers (at least 2: else when the second finishes)",
    ),
    policy_strategy(
        "quorum-3-deadline",
        lambda scale: Quorum(3) | Deadline(3.0 * scale, min_k=2),
        "quorum(3), but at 3 s go on with 2 if the third is late (policies combine with |)",
        min_proposers=4,
    ),
    policy_strategy(
        "quorum-cut",
        "quorum(2)",
        "quorum(2), and skip refinement layers when the finished answers agree",
        cut=LayerCut(agreement=0.99, similarity=final_line_match),
        min_layers=2,  # with one layer there is nothing to cut: it is quorum-2
    ),
    policy_strategy(
        "partial",
        "partial(3, min_tokens=24)",
        "start on partial answers once 3 proposers have 24 tokens (the references are frozen "
        "there)",
    ),
    policy_strategy(
        "deadline-partial",
        lambda scale: Deadline(1.0 * scale, min_k=2, partial=True),
        "start by time: at 1 s, take every answer so far (partial ones marked, frozen there)",
    ),
    Strategy(
        "self-moa",
        "four samples of the single best model, quorum(3), aggregated by the same model",
        _self_moa,
    ),
    staircase_strategy(
        "staircase",
        _start,
        "staircase by appended turns (any chat API): start once 2 proposers have 8 tokens (or "
        "at 0.5 s with any text); steps of 8, 16, 32, 64, 128 tokens, each adding the previous "
        "step's text as an assistant turn and what the proposers wrote since as a user turn; "
        "the answer waits to stay at most 32 tokens ahead of any running proposer",
    ),
    staircase_strategy(
        "staircase-prefill",
        _start,
        "the staircase by assistant prefill (vLLM continue_final_message): each step ends with "
        "the answer so far for the server to continue",
        continuation=_PREFILL,
    ),
    staircase_strategy(
        "staircase-whole",
        _start,
        "the staircase by appended turns in the whole layout: drafts quoted as whole sentences "
        "without status labels, re-rendered in place at each step; the first step waits (at "
        "most 1 s) for each running proposer's first sentence",
        layout="whole",
    ),
    staircase_strategy(
        "staircase-prefill-whole",
        _start,
        "the staircase by assistant prefill in the whole layout",
        continuation=_PREFILL,
        layout="whole",
    ),
    staircase_strategy(
        "staircase-deadline",
        lambda scale: Deadline(0.3 * scale, min_k=1, partial=True),
        "the staircase started by time: at 0.3 s with whatever text there is",
    ),
    staircase_strategy(
        "staircase-flat",
        _start,
        "the staircase with steps of a fixed 32 tokens",
        steps=(32,),
    ),
    staircase_strategy(
        "staircase-patient",
        _start,
        "the staircase that waits up to 5 s (instead of 1 s) for a step or a reference: the "
        "answer line is written from more finished references, at the cost of stalls",
        max_pause=5.0,
    ),
    staircase_strategy(
        "staircase-unpaced",
        _start,
        "the staircase that never waits for the proposers (no lead limit): steps only when "
        "something new arrived",
        lead=None,
    ),
)


def hedged_strategy(name: str, policy: str, description: str) -> Strategy:
    """``policy`` on every layer, with every proposer and the aggregator hedged to a second copy
    of the same request once it is later than the 90th percentile of that agent's recent times
    to first token (1 s, scaled, until 20 are known), within a budget of 10% extra requests."""

    def make(lineup: Lineup) -> MoA:
        def hedged(agent: Agent) -> Agent:
            hedge = Hedge(after=1.0 * lineup.time_scale, percentile=90, budget=0.1)
            return replace(agent, hedge=hedge)

        return moa(
            tuple(hedged(a) for a in lineup.proposers),
            hedged(lineup.aggregator),
            layers=lineup.layers,
            policy=parse_policy(policy),
            name=name,
        )

    return Strategy(name, description, make)


_HEDGED = (
    hedged_strategy(
        "wait-all-hedged",
        "wait_all",
        "wait_all, each request hedged past its agent's p90 time to first token (10% budget)",
    ),
    hedged_strategy(
        "quorum-2-hedged",
        "quorum(2)",
        "quorum(2), each request hedged past its agent's p90 time to first token (10% budget)",
    ),
)

#: The built-in strategies by name, in the order reports list them.
STRATEGIES: MappingProxyType[str, Strategy] = MappingProxyType(
    {s.name: s for s in (*_BUILT_IN, *_HEDGED)}
)


def get_strategies(names: list[str] | tuple[str, ...] | None) -> list[Strategy]:
    """The strategies named (all built-in ones when ``names`` is empty). A name of the form
    ``policy:TEXT`` is an ad-hoc strategy with that policy. Raises ``KeyError`` (unknown
    name) or :class:`moa_stream.ConfigError` (a policy that does not parse)."""
    if not names:
        return list(STRATEGIES.values())
    out = []
    for name in names:
        if name.startswith("policy:"):
            text = name.removeprefix("policy:").strip()
            parse_policy(text)  # fail now, not in the middle of a run
            out.append(policy_strategy(name, text, f"ad-hoc policy {text}"))
        elif name in STRATEGIES:
            out.append(STRATEGIES[name])
        else:
            raise KeyError(f"unknown strategy {name!r}; known: {', '.join(STRATEGIES)}")
    return out
