"""Benchmark scenarios: which simulated models answer, in how many layers, how many at once.

A :class:`Scenario` is a set of :class:`~moa_stream.sim.SimModel` (built from the simulator's
:data:`~moa_stream.sim.PROFILES`, each with a quiz accuracy), the number of proposer layers and
the number of runs in flight at once. The built-in set, :data:`SCENARIOS`, covers the cases the
benchmark report discusses; :data:`QUICK` is a tiny fixed-latency set for smoke runs and tests.

Model names are unique within a scenario: on the quiz, a model's wrong answers are fixed per
(model name, question), so distinct names give distinct mistakes, as distinct models make.

How faithfully the aggregator continues its own answer (a staircase's steps) is the scenario's
``continuation_profile``, one of the simulator's
:data:`~moa_stream.sim.CONTINUATION_PROFILES` (default: the aggregator's own, ``perfect``).
:func:`get_scenarios` also takes ``name@profile`` (``long-form@small``, ``long-form@strong``),
so one benchmark can run the same scenario with a small and a strong aggregator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType

from moa_stream.sim import (
    CONTINUATION_PROFILES,
    PROFILES,
    FaultProfile,
    LatencyProfile,
    SimModel,
)

__all__ = ["QUICK", "SCENARIOS", "STAIRCASE_STRATEGIES", "Scenario", "get_scenarios"]


@dataclass(frozen=True, slots=True)
class Scenario:
    """One benchmark setting.

    ``proposers`` answer in each of ``layers`` layers; ``aggregator`` writes the final answer.
    ``concurrency`` runs are kept in flight at once. ``requests`` is the default number of runs
    per strategy (the quiz has 120 questions, so up to 120 runs ask distinct questions).
    ``strategies`` names the strategies run by default (``None``: all of them).
    ``policy_scale`` multiplies the times in policies (deadlines), which are written for the
    simulator's real-time profiles: a scenario of millisecond models needs millisecond deadlines.
    ``ramp_s`` spreads the first ``concurrency`` runs' starts over that many seconds (about one
    run's length), as users arrive over time rather than all in the same millisecond.
    ``continuation_profile`` names the :data:`~moa_stream.sim.CONTINUATION_PROFILES` entry the
    aggregator continues its answers with (``None``: as its model says); the scenario's
    :attr:`aggregator` carries it.
    """

    name: str
    description: str
    proposers: tuple[SimModel, ...]
    aggregator: SimModel
    layers: int = 1
    concurrency: int = 64
    requests: int = 120
    strategies: tuple[str, ...] | None = None
    policy_scale: float = 1.0
    ramp_s: float = 3.0
    continuation_profile: str | None = None

    def __post_init__(self) -> None:
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"scenario {self.name}: model names must be unique: {names}")
        if self.layers < 1 or self.concurrency < 1 or self.requests < 1:
            raise ValueError(f"scenario {self.name}: layers, concurrency, requests must be >= 1")
        if self.continuation_profile is not None:
            profile = CONTINUATION_PROFILES.get(self.continuation_profile)
            if profile is None:
                raise ValueError(
                    f"scenario {self.name}: unknown continuation profile "
                    f"{self.continuation_profile!r}; known: {', '.join(CONTINUATION_PROFILES)}"
                )
            # The aggregator is what the simulator hosts, so it carries the profile (frozen:
            # set once, here, as dataclasses document for derived fields).
            object.__setattr__(self, "aggregator", replace(self.aggregator, continuation=profile))

    @property
    def models(self) -> tuple[SimModel, ...]:
        """Every model the simulator must host: the proposers, then the aggregator."""
        return (*self.proposers, self.aggregator)

    @property
    def best(self) -> SimModel:
        """The single best model: the most accurate one (the faster one on a tie)."""
        return max(self.models, key=lambda m: (m.accuracy, -m.latency.ttft_p50))

    def with_continuation(self, profile: str) -> Scenario:
        """This scenario with an aggregator that continues its answers as ``profile`` (a
        :data:`~moa_stream.sim.CONTINUATION_PROFILES` name) says, named ``<name>@<profile>``
        so its results stay apart from the original's."""
        base = self.name.split("@", 1)[0]
        return replace(self, name=f"{base}@{profile}", continuation_profile=profile)

    def scaled(self, factor: float) -> Scenario:
        """This scenario with every delay multiplied by ``factor`` (decode rates divided)."""
        if factor == 1.0:
            return self

        def scale(m: SimModel) -> SimModel:
            faults = replace(m.faults, retry_after_s=m.faults.retry_after_s * factor)
            return replace(m, latency=m.latency.scaled(factor), faults=faults)

        return replace(
            self,
            proposers=tuple(scale(m) for m in self.proposers),
            aggregator=scale(self.aggregator),
        )


def _model(
    name: str,
    profile: str,
    accuracy: float,
    *,
    tokens: int = 120,
    sigma: float = 0.3,
    faults: FaultProfile | None = None,
    answer_at: str = "end",
) -> SimModel:
    return SimModel(
        name=name,
        latency=PROFILES[profile],
        faults=faults or FaultProfile(),
        answer_tokens=tokens,
        answer_tokens_sigma=sigma,
        accuracy=accuracy,
        answer_at="start" if answer_at == "start" else "end",
    )


def _heterogeneous(answer_at: str = "end", flaky: bool = False) -> tuple[SimModel, ...]:
    # The simulator's default set: four classes of model, from fast and weak to slow and strong.
    medium_faults = None
    if flaky:
        # One provider that fails often: refusals (retried after their Retry-After or a short
        # back-off) and connections reset part-way through an answer (not retried: the
        # answer had started).
        medium_faults = FaultProfile(
            rate_limit=0.10, server_error=0.05, reset_mid=0.10, retry_after_s=0.5
        )
    return (
        _model("small-fast", "small-fast", 0.55, answer_at=answer_at),
        _model("medium", "medium", 0.70, answer_at=answer_at, faults=medium_faults),
        _model("large-slow", "large-slow", 0.85, answer_at=answer_at),
        _model("heavy-tail", "heavy-tail", 0.65, answer_at=answer_at),
    )


_AGGREGATOR = _model("aggregator", "medium", 0.80, tokens=160)


def _long_form() -> tuple[SimModel, ...]:
    # Chat-length answers: a median of 560 tokens, 95% of them within about 400 to 800.
    return tuple(
        _model(m.name, profile, m.accuracy, tokens=560, sigma=0.18)
        for m, profile in zip(
            _heterogeneous(), ("small-fast", "medium", "large-slow", "heavy-tail"), strict=True
        )
    )


#: The staircase strategies, run on the scenarios where the first token is at stake.
STAIRCASE_STRATEGIES = (
    "staircase",
    "staircase-prefill",
    "staircase-whole",
    "staircase-prefill-whole",
    "staircase-deadline",
    "staircase-flat",
    "staircase-patient",
    "staircase-unpaced",
)

#: Strategies worth running on every scenario; the heterogeneous one runs them all.
_CORE = (
    "single",
    "reference-moa",
    "wait-all",
    "quorum-2",
    "deadline",
    "partial",
    "deadline-partial",
    "self-moa",
    "staircase",
)


def _alike(name: str, description: str, prefix: str, profile: str) -> Scenario:
    """Four proposers of one class (``prefix-1`` to ``prefix-4``, 0.70 accuracy each) under the
    usual aggregator, on the core strategies."""
    proposers = tuple(_model(f"{prefix}-{i}", profile, 0.70) for i in range(1, 5))
    return Scenario(name, description, proposers, _AGGREGATOR, strategies=_CORE)


_BUILT_IN = (
    Scenario(
        "heterogeneous",
        "four proposers of four classes (small-fast 0.55, medium 0.70, large-slow 0.85, "
        "heavy-tail 0.65 accuracy), medium-class aggregator (0.80)",
        _heterogeneous(),
        _AGGREGATOR,
    ),
    Scenario(
        "long-form",
        "the heterogeneous set writing chat-length answers (400-800 tokens; the aggregator "
        "about 700), as MoA is used for chat",
        _long_form(),
        _model("aggregator", "medium", 0.80, tokens=700, sigma=0.18),
        ramp_s=10.0,
        strategies=(
            "single",
            "reference-moa",
            "wait-all",
            "quorum-2",
            "partial",
            "deadline-partial",
            *STAIRCASE_STRATEGIES,
        ),
    ),
    _alike(
        "homogeneous",
        "four medium-class proposers (0.70 accuracy each), medium-class aggregator (0.80)",
        "medium",
        "medium",
    ),
    _alike(
        "heavy-tail",
        "four proposers on busy shared endpoints (TTFT p50 0.5 s, p95 4 s; 0.70 accuracy), "
        "medium-class aggregator (0.80)",
        "busy",
        "heavy-tail",
    ),
    Scenario(
        "flaky",
        "the heterogeneous set with one flaky provider (medium: 10% HTTP 429, 5% HTTP 500, "
        "10% connection reset mid-answer)",
        _heterogeneous(flaky=True),
        _AGGREGATOR,
        strategies=_CORE,
    ),
    Scenario(
        "two-layer",
        "the heterogeneous set with one refinement layer (proposers answer twice)",
        _heterogeneous(),
        _AGGREGATOR,
        layers=2,
        strategies=(*_CORE, "quorum-cut"),
    ),
    Scenario(
        "answer-first",
        "the heterogeneous set, proposers prompted to state their answer first",
        _heterogeneous(answer_at="start"),
        _AGGREGATOR,
        strategies=(
            "reference-moa",
            "wait-all",
            "quorum-2",
            "partial",
            "deadline-partial",
            "staircase",
        ),
    ),
    Scenario(
        "unloaded",
        "the heterogeneous set, one run at a time",
        _heterogeneous(),
        _AGGREGATOR,
        concurrency=1,
        requests=12,
        strategies=("reference-moa", "quorum-2", "partial", "deadline-partial", "staircase"),
    ),
)

#: The built-in scenarios by name.
SCENARIOS: MappingProxyType[str, Scenario] = MappingProxyType({s.name: s for s in _BUILT_IN})


def _quick_model(name: str, ttft: float, tps: float, accuracy: float, tokens: int) -> SimModel:
    return SimModel(
        name=name,
        latency=LatencyProfile.fixed(ttft=ttft, tokens_per_s=tps),
        answer_tokens=tokens,
        accuracy=accuracy,
    )


#: A seconds-long smoke scenario: fixed, fast latencies and short answers.
QUICK = Scenario(
    "quick",
    "three fixed-latency proposers (20, 40, 80 ms TTFT; 24 tokens) and a fixed aggregator",
    (
        _quick_model("fast", 0.02, 800.0, 0.55, 24),
        _quick_model("mid", 0.04, 600.0, 0.70, 24),
        _quick_model("slow", 0.08, 400.0, 0.85, 24),
    ),
    _quick_model("agg", 0.02, 1000.0, 0.80, 24),
    concurrency=4,
    requests=8,
    policy_scale=0.04,
    ramp_s=0.05,
)


def get_scenarios(names: Sequence[str] | None, *, quick: bool = False) -> list[Scenario]:
    """The scenarios named (all built-in ones when ``names`` is empty; :data:`QUICK` with
    ``quick``). ``name@profile`` is the scenario with its aggregator continuing as the
    continuation profile says (see :meth:`Scenario.with_continuation`). Raises ``KeyError``
    naming the unknown scenario or profile."""
    known = {**SCENARIOS, QUICK.name: QUICK}
    if not names:
        return [QUICK] if quick else list(SCENARIOS.values())
    out = []
    for name in names:
        base, _, profile = name.partition("@")
        if base not in known:
            raise KeyError(f"unknown scenario {base!r}; known: {', '.join(known)}")
        if profile and profile not in CONTINUATION_PROFILES:
            raise KeyError(
                f"unknown continuation profile {profile!r} in {name!r}; "
                f"known: {', '.join(CONTINUATION_PROFILES)}"
            )
        out.append(known[base].with_continuation(profile) if profile else known[base])
    return out
