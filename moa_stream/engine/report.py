"""The run's report, built from its records: no I/O, no clock, nothing kept.

:func:`build_report` reads the run's :class:`~moa_stream.engine.layer.Call` records and
layer reports as they stand, so a report taken mid-run shows the run so far, and the run
rebuilds it until it has closed (stragglers of ``keep`` layers still add their usage).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

from moa_stream._types import Usage
from moa_stream.engine.events import AgentReport, LayerReport, ReferenceInfo, RunReport
from moa_stream.engine.layer import Call, Decision, LayerState

if TYPE_CHECKING:
    from moa_stream.engine.aggregate import Answer

__all__ = ["agent_report", "build_report", "layer_report", "reference_infos"]


def agent_report(call: Call, t0: float) -> AgentReport:
    """One request's line of the report; a request still running counts as ``partial``
    (``cancelled`` once its task was cancelled)."""
    status: Literal["complete", "partial", "failed", "cancelled"]
    if call.status != "running":
        status = call.status
    elif call.outcome == "cancelled":
        status = "cancelled"
    else:
        status = "partial"
    return AgentReport(
        agent=call.agent,
        model=call.model,
        provider=call.provider,
        role=call.role,
        layer=call.layer,
        index=call.index,
        status=status,
        started_s=call.started_at - t0,
        ttft_s=None if call.first_token_at is None else call.first_token_at - call.started_at,
        duration_s=None if call.ended_at is None else call.ended_at - call.started_at,
        usage=call.usage(),
        chars=call.chars,
        error=call.error,
        hedge=call.hedge,
        request_id=call.request_id,
    )


def build_report(
    calls: Sequence[Call],
    layers: Sequence[LayerReport],
    answer: Answer,
    *,
    t0: float,
    end: float,
    error: str | None,
) -> RunReport:
    """The report of a run that started at ``t0`` and ended at ``end`` (or is at ``end`` now).

    ``calls`` are every request in the order sent, ``layers`` the decided layers, ``answer``
    the answer as written (its text, the aggregator request that stands for it, a failed one
    not named, when its first token reached the caller and why it ended), ``error`` why the
    run ended early, if it did.
    """
    agents = tuple(agent_report(c, t0) for c in calls)
    total = Usage()
    for a in agents:
        total = total + a.usage
    agg = answer.call
    first_token_at = answer.first_token_at
    return RunReport(
        text=answer.text,
        aggregator=agg.agent if agg is not None and agg.status != "failed" else None,
        ttft_s=None if first_token_at is None else first_token_at - t0,
        time_to_quorum_s=layers[0].decided_s if layers else None,
        aggregator_ttft_s=(
            None
            if agg is None or agg.first_token_at is None
            else agg.first_token_at - agg.started_at
        ),
        total_s=end - t0,
        usage=total,
        layers=tuple(layers),
        agents=agents,
        finish_reason=answer.finish_reason,
        hedges=sum(1 for a in agents if a.hedge is not None),
        error=error,
    )


def reference_infos(state: LayerState, decision: Decision) -> tuple[ReferenceInfo, ...]:
    """What the layer handed on, reference by reference (its tokens: the request's usage)."""
    calls = state.calls
    return tuple(
        ReferenceInfo(
            r.agent,
            r.index,
            r.status,
            len(r.text),
            calls[r.index].usage().completion_tokens if r.status != "failed" else 0,
        )
        for r in decision.references
    )


def layer_report(
    li: int,
    state: LayerState,
    decision: Decision,
    t0: float,
    cut: Literal["agreement", "budget"] | None,
    agreement: float | None,
) -> LayerReport:
    """Layer ``li``'s line of the report, at its decision."""
    return LayerReport(
        li,
        decision.reason,
        decision.at - t0,
        reference_infos(state, decision),
        cut,
        agreement,
        None if decision.fallback is None else repr(decision.fallback),
    )
