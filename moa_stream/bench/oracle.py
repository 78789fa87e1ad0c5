"""The oracle: the best TTFT a run's references allowed, from the simulator's own schedule.

The simulator decides everything a reply does before it writes a byte: the time of every token
relative to the start of generation, which fault strikes and where. Its request records
(:class:`moa_stream.sim.SimRecord`: ``token_offsets``, ``end_offset``, ``fault_at``...) keep
that plan, so for any run the benchmark can look up, for each request it made (by the upstream
request id the client saw), when each token was due to leave the server.

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

from moa_stream.bench.trace import CallTrace, RunTrace

__all__ = [
    "OracleParts",
    "RecordSchedule",
    "Schedule",
    "Scheduled",
    "ScheduledAttempt",
    "attempt_cost",
    "oracle_parts",
    "oracle_ttft",
    "ready_at",
    "run_oracle",
]


class ScheduledAttempt(Protocol):
    """One attempt of a request as the upstream scheduled it; offsets in seconds after its
    generation started."""

    @property
    def offsets(self) -> Sequence[float]: ...
    @property
    def token_chars(self) -> Sequence[int]: ...
    @property
    def end_offset(self) -> float: ...
    @property
    def fault(self) -> str | None: ...
    @property
    def fault_at(self) -> int: ...
    @property
    def retry_after_s(self) -> float: ...


@dataclass(frozen=True, slots=True)
class Scheduled:
    """A :class:`ScheduledAttempt` from a simulator record (see
    :func:`moa_stream.bench._simhost.record_fields`)."""

    offsets: tuple[float, ...]
    token_chars: tuple[int, ...]
    end_offset: float
    fault: str | None = None
    fault_at: int = 0
    retry_after_s: float = 0.0

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Scheduled:
        offsets = tuple(float(t) for t in record["token_offsets"])
        end = record["end_offset"]
        retry_after = record["retry_after_s"]
        return cls(
            offsets,
            tuple(int(c) for c in record["token_chars"]),
            (offsets[-1] if offsets else 0.0) if end is None else float(end),
            record["fault"],
            int(record["fault_at"]),
            0.0 if retry_after is None else float(retry_after),
        )


def _first_offset(attempt: ScheduledAttempt) -> float:
    """When the first token (or, with none, the finish chunk) went out."""
    return attempt.offsets[0] if attempt.offsets else attempt.end_offset


def _event_offset(attempt: ScheduledAttempt, k: int) -> float:
    """When something scheduled after ``k`` content tokens happened."""
    offsets = attempt.offsets
    return offsets[k] if k < len(offsets) else attempt.end_offset


def oracle_ttft(layers: Sequence[Sequence[float]], aggregator_ttft: float) -> float:
    """The oracle for ready times per layer (seconds after each layer's start) and the
    aggregator's scheduled TTFT. A layer with no ready time costs nothing."""
    return sum(max(ready) for ready in layers if ready) + aggregator_ttft


def attempt_cost(attempt: ScheduledAttempt) -> float:
    """How long a failed attempt held a reference up, by the simulator's schedule."""
    if attempt.fault == "rate_limit":
        return attempt.retry_after_s
    if attempt.fault == "server_error":
        return 0.0
    return _event_offset(attempt, attempt.fault_at)


def ready_at(attempts: Sequence[ScheduledAttempt], used_chars: int | None = None) -> float:
    """When a reference became usable, seconds after its first attempt arrived.

    ``attempts`` are in order (the last one delivered the text); ``used_chars`` is how much of
    its text was used (``None``: all of it, so the reference is ready at its end).
    """
    if not attempts:
        raise ValueError("a reference needs at least one attempt")
    before = sum(attempt_cost(p) for p in attempts[:-1])
    last = attempts[-1]
    if used_chars is None or not last.token_chars:
        return before + last.end_offset
    sent = 0
    for offset, chars in zip(last.offsets, last.token_chars, strict=True):
        sent += chars
        if sent >= used_chars:
            return before + offset
    return before + last.end_offset


class Schedule(Protocol):
    """Anything that can say how the upstream scheduled a call's attempts."""

    def attempts(self, call: CallTrace) -> Sequence[ScheduledAttempt] | None:
        """The call's ``call.tries`` attempts in order; ``None`` if they are not known."""
        ...


class RecordSchedule:
    """The simulator's schedule of a benchmark cell, from its request records (as
    :func:`~moa_stream.bench._simhost.record_fields` gives them), found by request id.

    A call's earlier attempts are the records of the same request (``repeat_key``) just before
    its last one (``occurrence``): the benchmark gives every run a distinct prompt, so only
    retries repeat a request.
    """

    __slots__ = ("_by_id", "_by_repeat")

    def __init__(self, records: Mapping[str, Mapping[str, Any]]) -> None:
        self._by_id = records
        self._by_repeat = {(r["repeat_key"], r["occurrence"]): r for r in records.values()}

    def attempts(self, call: CallTrace) -> list[Scheduled] | None:
        last = self._by_id.get(call.request_id) if call.request_id is not None else None
        if last is None:
            return None
        key, occurrence = last["repeat_key"], last["occurrence"]
        found = [
            self._by_repeat.get((key, i))
            for i in range(max(0, occurrence - call.tries + 1), occurrence)
        ]
        if any(r is None for r in found):
            return None
        return [Scheduled.from_record(r) for r in [*found, last] if r is not None]


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
            attempts = None if call is None else schedule.attempts(call)
            if not attempts:
                return None
            ready.append(ready_at(attempts, ref.chars if ref.status == "partial" else None))
        layers.append(ready)
    aggregator_calls = [c for c in trace.calls if c.role == "aggregator"]
    # The first aggregator request that answered gave the first token (later ones, if any,
    # are staircase steps).
    answered = next((c for c in aggregator_calls if c.ttft_s is not None), None)
    if answered is None:
        return None
    before = 0.0
    for call in itertools.takewhile(lambda c: c is not answered, aggregator_calls):
        earlier = schedule.attempts(call)
        if earlier is None:
            return None
        before += sum(attempt_cost(p) for p in earlier)
    attempts = schedule.attempts(answered)
    if not attempts:
        return None
    aggregator = before + sum(attempt_cost(p) for p in attempts[:-1]) + _first_offset(attempts[-1])
    return OracleParts(tuple(max(ready) if ready else 0.0 for ready in layers), aggregator)
