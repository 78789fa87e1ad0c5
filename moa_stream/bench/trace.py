"""What one benchmark run did, in one shape for the engine and for the reference MoA.

A :class:`RunTrace` lists every upstream request (:class:`CallTrace`, with the request it sent
when known) and every layer decision (:class:`LayerTrace`, with the references it took). The
oracle reads it to compute the best TTFT those references allowed; the timeline plot draws it.
Times are seconds since the run started.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from moa_stream._types import ChatRequest
from moa_stream.bench._recording import LoggedCall
from moa_stream.engine.events import RunReport

__all__ = ["CallStatus", "CallTrace", "LayerTrace", "RefTrace", "RunTrace", "trace_from_report"]

CallStatus = Literal["complete", "partial", "failed", "cancelled"]


@dataclass(frozen=True, slots=True)
class CallTrace:
    """One upstream request. ``layer`` is the proposer layer (for the aggregator: the number of
    layers run); ``index`` the proposer's position (for the aggregator: the attempt, 0 first).
    ``ttft_s`` is from the request's start; ``None`` when no token came (or, for non-streamed
    requests, when the answer came whole: then only ``duration_s`` is known).

    For streamed requests, ``sent_at`` (the request written), ``first_read_at`` (the read that
    brought the first token) and ``last_read_at`` (the last read that brought any delta) are
    the client's own timestamps on ``time.monotonic()``."""

    role: Literal["proposer", "aggregator"]
    layer: int
    index: int
    agent: str
    model: str
    status: CallStatus
    started_s: float
    ttft_s: float | None
    duration_s: float | None
    streamed: bool = True
    request: ChatRequest | None = field(default=None, repr=False, compare=False)
    tries: int = 1
    request_id: str | None = None
    sent_at: float | None = field(default=None, compare=False)
    first_read_at: float | None = field(default=None, compare=False)
    last_read_at: float | None = field(default=None, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "layer": self.layer,
            "index": self.index,
            "agent": self.agent,
            "model": self.model,
            "status": self.status,
            "started_s": self.started_s,
            "ttft_s": self.ttft_s,
            "duration_s": self.duration_s,
            "streamed": self.streamed,
            "tries": self.tries,
            "request_id": self.request_id,
        }


@dataclass(frozen=True, slots=True)
class RefTrace:
    """A reference as a layer took it: the proposer's ``index``, its status, its length."""

    index: int
    status: str
    chars: int


@dataclass(frozen=True, slots=True)
class LayerTrace:
    layer: int
    reason: str
    decided_s: float
    references: tuple[RefTrace, ...]

    @property
    def used(self) -> tuple[RefTrace, ...]:
        """The references whose text went forward (complete or partial)."""
        return tuple(r for r in self.references if r.status in ("complete", "partial"))

    def to_json(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "reason": self.reason,
            "decided_s": self.decided_s,
            "references": [
                {"index": r.index, "status": r.status, "chars": r.chars} for r in self.references
            ],
        }


@dataclass(frozen=True, slots=True)
class RunTrace:
    """One run. ``started_at`` is its start on ``time.monotonic()`` (the clock the simulator's
    records use too, in any process), when known."""

    calls: tuple[CallTrace, ...]
    layers: tuple[LayerTrace, ...]
    ttft_s: float | None
    total_s: float
    started_at: float | None = None

    def call(self, role: str, layer: int, index: int) -> CallTrace | None:
        for c in self.calls:
            if c.role == role and c.layer == layer and c.index == index:
                return c
        return None

    def to_json(self) -> dict[str, Any]:
        return {
            "ttft_s": self.ttft_s,
            "total_s": self.total_s,
            "calls": [c.to_json() for c in self.calls],
            "layers": [layer.to_json() for layer in self.layers],
        }


def trace_from_report(
    report: RunReport, logged: Sequence[LoggedCall], started_at: float | None = None
) -> RunTrace:
    """The trace of an engine run, its requests matched from the run's call log.

    A report entry and a logged request are the same request when they carry the same upstream
    request id. Entries without one (an upstream that sends no id) fall back to order: the
    engine opens its streams in the order its report lists them, and matching per model (the
    n-th unmatched logged request for a model is the n-th such report entry for it) keeps that
    robust even if requests to different models interleave differently.
    """
    by_id = {call.request_id: call for call in logged if call.request_id is not None}
    matched = [by_id.pop(a.request_id, None) if a.request_id else None for a in report.agents]
    taken = {id(call) for call in matched if call is not None}
    pending: dict[str, list[LoggedCall]] = {}
    for call in logged:
        if id(call) not in taken:
            pending.setdefault(call.model, []).append(call)
    calls = []
    for a, match in zip(report.agents, matched, strict=True):
        if match is None:
            queue = pending.get(a.model)
            match = queue.pop(0) if queue else None
        timings = match.stream.timings if match is not None and match.stream is not None else None
        calls.append(
            CallTrace(
                role=a.role,
                layer=a.layer,
                index=a.index,
                agent=a.agent,
                model=a.model,
                status=a.status,
                started_s=a.started_s,
                ttft_s=a.ttft_s,
                duration_s=a.duration_s,
                request=None if match is None else match.request,
                tries=1 if match is None else match.tries,
                request_id=None if match is None else match.request_id,
                sent_at=None if timings is None else timings.request_sent,
                first_read_at=None if timings is None else timings.first_token,
                last_read_at=(
                    timings.chunk_times[-1] if timings is not None and timings.chunk_times else None
                ),
            )
        )
    layers = tuple(
        LayerTrace(
            layer.layer,
            layer.reason,
            layer.decided_s,
            tuple(RefTrace(r.index, r.status, r.chars) for r in layer.references),
        )
        for layer in report.layers
    )
    return RunTrace(tuple(calls), layers, report.ttft_s, report.total_s, started_at)
