"""The oracle: the best TTFT a run's references allowed, from the simulator's own schedule.

The simulator decides everything a reply does before it writes a byte: the time of every token
relative to the request's arrival (:func:`moa_stream.sim._plan.build_plan`, a pure function of
the model, the request, the seed and how many times that exact request was seen). So for any
run the benchmark can recompute, for each request it made, when each token left the server.

With zero orchestration cost, every layer's requests would arrive at the simulator the moment
the layer started, a reference would be usable the moment its last used token (for a complete
reference: its end) was sent, the next layer or the aggregator would start the moment the last
reference it used was usable, and the first answer token would follow after the aggregator's
own scheduled TTFT. So::

    oracle TTFT = sum over layers of max over used references of ready(reference)
                  + the aggregator's scheduled TTFT

for the *same references the run used*: the bound is on orchestration, not on the policy's
choice (a deadline that waited longer than its references needed shows up as measured > oracle).
A reference that needed retries is ready after its earlier attempts failed, as the simulator
failed them (a refusal at once plus its ``Retry-After``, a mid-stream fault at its token), and
its last attempt delivered. Client back-off beyond ``Retry-After`` counts as orchestration.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from moa_stream._types import ChatRequest
from moa_stream.bench.trace import RunTrace
from moa_stream.sim import SimModel
from moa_stream.sim._plan import Plan, build_plan, parse_request

__all__ = [
    "OracleParts",
    "Schedule",
    "SimSchedule",
    "attempt_cost",
    "oracle_parts",
    "oracle_ttft",
    "ready_at",
    "run_oracle",
]


def oracle_ttft(layers: Sequence[Sequence[float]], aggregator_ttft: float) -> float:
    """The oracle for ready times per layer (seconds after each layer's start) and the
    aggregator's scheduled TTFT. A layer with no ready time costs nothing."""
    return sum(max(ready) for ready in layers if ready) + aggregator_ttft


def attempt_cost(plan: Plan) -> float:
    """How long a failed attempt held a reference up, by the simulator's schedule."""
    if plan.fault == "rate_limit":
        return plan.retry_after_s
    if plan.fault == "server_error":
        return 0.0
    return plan.event_offset(plan.fault_at)


def ready_at(plans: Sequence[Plan], used_chars: int | None = None) -> float:
    """When a reference became usable, seconds after its first attempt arrived.

    ``plans`` are its attempts in order (the last one delivered the text); ``used_chars`` is how
    much of its text was used (``None``: all of it, so the reference is ready at its end).
    """
    if not plans:
        raise ValueError("a reference needs at least one attempt")
    before = sum(attempt_cost(p) for p in plans[:-1])
    last = plans[-1]
    if used_chars is None or not last.tokens:
        return before + last.end_offset
    sent = 0
    for offset, token in zip(last.offsets, last.tokens, strict=True):
        sent += len(token)
        if sent >= used_chars:
            return before + offset
    return before + last.end_offset


def _body(request: ChatRequest) -> bytes:
    """A request body as a provider would send it, for the fields the schedule depends on."""
    body: dict[str, Any] = {"model": request.model, "messages": list(request.messages)}
    if request.max_tokens is not None:
        body["max_tokens"] = request.max_tokens
    if request.stop:
        body["stop"] = list(request.stop)
    for key in ("seed", "sim"):
        if key in request.extra:
            body[key] = request.extra[key]
    return orjson.dumps(body)


class Schedule(Protocol):
    """Anything that can say how the upstream scheduled a request's attempts."""

    def plans(self, request: ChatRequest, tries: int = 1) -> list[Plan]: ...


@dataclass(frozen=True, slots=True)
class SimSchedule:
    """The simulator's planning for one server: its models and seed."""

    models: Mapping[str, SimModel]
    seed: int

    def plans(self, request: ChatRequest, tries: int = 1) -> list[Plan]:
        """The plans of ``tries`` attempts of ``request``, in order.

        Attempt ``i`` is the request's ``i``-th occurrence at the server: the benchmark gives
        every run a distinct prompt, so only retries repeat a request.
        """
        model = self.models[request.model]
        parsed = parse_request(_body(request))
        return [
            build_plan(model, parsed, seed=self.seed, occurrence=i) for i in range(max(1, tries))
        ]


@dataclass(frozen=True, slots=True)
class OracleParts:
    """The oracle of one run in its parts: each layer's ready time (after the layer's start)
    and the aggregator's scheduled TTFT (retries included)."""

    layers: tuple[float, ...]
    aggregator: float

    @property
    def ttft(self) -> float:
        return sum(self.layers) + self.aggregator


def run_oracle(trace: RunTrace, schedule: Schedule) -> float | None:
    """The oracle TTFT of one run; ``None`` if it produced no answer or a request is unknown."""
    parts = oracle_parts(trace, schedule)
    return None if parts is None else parts.ttft


def oracle_parts(trace: RunTrace, schedule: Schedule) -> OracleParts | None:
    """:func:`run_oracle` in its parts."""
    if trace.ttft_s is None:
        return None
    layers: list[list[float]] = []
    for layer in trace.layers:
        ready: list[float] = []
        for ref in layer.used:
            call = trace.call("proposer", layer.layer, ref.index)
            if call is None or call.request is None:
                return None
            plans = schedule.plans(call.request, call.tries)
            ready.append(ready_at(plans, ref.chars if ref.status == "partial" else None))
        layers.append(ready)
    aggregator_calls = [c for c in trace.calls if c.role == "aggregator"]
    # The first aggregator request that answered gave the first token (later ones, if any,
    # are staircase steps).
    answered = next((c for c in aggregator_calls if c.ttft_s is not None), None)
    if answered is None or answered.request is None:
        return None
    before = 0.0
    for call in itertools.takewhile(lambda c: c is not answered, aggregator_calls):
        if call.request is None:
            return None
        before += sum(attempt_cost(p) for p in schedule.plans(call.request, call.tries))
    plans = schedule.plans(answered.request, answered.tries)
    aggregator = before + sum(attempt_cost(p) for p in plans[:-1]) + plans[-1].first_offset
    return OracleParts(tuple(max(ready) if ready else 0.0 for ready in layers), aggregator)
