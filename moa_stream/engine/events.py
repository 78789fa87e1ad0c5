"""Typed events of a MoA run, and the report it ends with.

Every event is a small frozen, slotted dataclass whose first field ``type`` is a dotted literal;
``orjson.dumps(event)`` serializes any of them directly. ``t`` is the event's time in seconds
since the run started (monotonic clock).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from moa_stream._types import Usage

__all__ = [
    "AgentReport",
    "AggregatorDelta",
    "AggregatorDone",
    "AggregatorFailed",
    "AggregatorStarted",
    "AggregatorStep",
    "AggregatorStepRejected",
    "Event",
    "Hedged",
    "HedgeInfo",
    "LayerDone",
    "LayerEndReason",
    "LayerReport",
    "ProposerDelta",
    "ProposerDone",
    "ProposerFailed",
    "ProposerStarted",
    "ReferenceInfo",
    "ReferenceStatus",
    "RunDone",
    "RunReport",
]

#: Why a layer stopped waiting for its proposers.
#: ``all``: every proposer finished or failed; ``quorum``: enough had finished; ``deadline``:
#: its time ran out; ``partial``: enough partial text to start (staircase); ``degraded``: the
#: policy could no longer be met and the layer went on with what it had.
LayerEndReason = Literal["all", "quorum", "deadline", "partial", "degraded"]

#: What a reference was when the next step took it: ``complete`` (finished with a usable
#: answer), ``partial`` (still streaming: its text so far) or ``failed`` (an error, or an
#: answer that was not usable: empty, truncated, filtered). Proposers cancelled before the
#: decision are left out of the references.
ReferenceStatus = Literal["complete", "partial", "failed"]


@dataclass(frozen=True, slots=True)
class ReferenceInfo:
    """One proposer's answer as the next step saw it. ``tokens`` is the call's completion
    tokens as its provider counts them (the same figure as in ``proposer.done``)."""

    agent: str
    index: int
    status: ReferenceStatus
    chars: int
    tokens: int


@dataclass(frozen=True, slots=True)
class ProposerStarted:
    type: Literal["proposer.started"] = field(default="proposer.started", init=False)
    layer: int
    index: int
    agent: str
    t: float


@dataclass(frozen=True, slots=True)
class ProposerDelta:
    """New content from a proposer (``text`` is only the new part)."""

    type: Literal["proposer.delta"] = field(default="proposer.delta", init=False)
    layer: int
    index: int
    agent: str
    text: str
    t: float


@dataclass(frozen=True, slots=True)
class ProposerDone:
    type: Literal["proposer.done"] = field(default="proposer.done", init=False)
    layer: int
    index: int
    agent: str
    text: str
    finish_reason: str | None
    usage: Usage
    ttft_s: float | None
    t: float


@dataclass(frozen=True, slots=True)
class ProposerFailed:
    """A proposer's request failed (``error`` is its message, ``kind`` the error's kind)."""

    type: Literal["proposer.failed"] = field(default="proposer.failed", init=False)
    layer: int
    index: int
    agent: str
    error: str
    kind: str
    t: float


@dataclass(frozen=True, slots=True)
class LayerDone:
    """A layer's decision: which references go forward and why it stopped waiting.

    ``fallback`` is set (reason ``degraded``) when the policy could no longer be met and the
    layer waited instead for the rule still reachable, written in the policy language
    (``quorum(2)``).

    ``cut`` is set when the remaining refinement layers are skipped: ``"agreement"`` (the
    answers agree above the threshold) or ``"budget"`` (another layer would exceed the run's
    TTFT budget).
    """

    type: Literal["layer.done"] = field(default="layer.done", init=False)
    layer: int
    reason: LayerEndReason
    references: tuple[ReferenceInfo, ...]
    cut: Literal["agreement", "budget"] | None
    agreement: float | None
    t: float
    fallback: str | None = None


@dataclass(frozen=True, slots=True)
class AggregatorStarted:
    """An aggregator request was sent. ``attempt`` is 0 for the first choice, then fallbacks."""

    type: Literal["aggregator.started"] = field(default="aggregator.started", init=False)
    agent: str
    attempt: int
    t: float


@dataclass(frozen=True, slots=True)
class AggregatorDelta:
    """New content of the final answer, passed on the moment it arrived."""

    type: Literal["aggregator.delta"] = field(default="aggregator.delta", init=False)
    text: str
    t: float


@dataclass(frozen=True, slots=True)
class AggregatorFailed:
    """An aggregator failed. Before its first token the next fallback, if any, follows; after
    it the run ends with :class:`moa_stream.AggregatorError` right after this event."""

    type: Literal["aggregator.failed"] = field(default="aggregator.failed", init=False)
    agent: str
    attempt: int
    error: str
    kind: str
    t: float


@dataclass(frozen=True, slots=True)
class AggregatorStep:
    """A staircase step was asked (``step`` 0 is the first request). ``references`` is the
    state of every reference the step sees (``chars``: how much of it the prompt holds);
    ``answer_chars`` what the answer had when it was asked; ``final``: every reference was
    complete, failed or given up on, so this step runs to the end."""

    type: Literal["aggregator.step"] = field(default="aggregator.step", init=False)
    agent: str
    step: int
    continuation: str
    references: tuple[ReferenceInfo, ...]
    answer_chars: int
    final: bool
    t: float


@dataclass(frozen=True, slots=True)
class AggregatorStepRejected:
    """A staircase step's first words were not passed on (``reason``: ``restart``,
    ``markup``, ``instruction text``, ``new line mid-sentence``, ``ended early``,
    ``not ready in time`` or the provider's error kind); the previous step's stream goes on."""

    type: Literal["aggregator.step_rejected"] = field(
        default="aggregator.step_rejected", init=False
    )
    agent: str
    step: int
    reason: str
    t: float


@dataclass(frozen=True, slots=True)
class AggregatorDone:
    type: Literal["aggregator.done"] = field(default="aggregator.done", init=False)
    agent: str
    finish_reason: str | None
    usage: Usage
    ttft_s: float | None
    t: float


@dataclass(frozen=True, slots=True)
class HedgeInfo:
    """A hedge that was sent: ``after_s`` seconds after the request, to ``backup``
    (``provider/model``); ``winner`` is the copy that streamed first (``None``: neither did)."""

    backup: str
    after_s: float
    winner: Literal["primary", "backup"] | None


@dataclass(frozen=True, slots=True)
class Hedged:
    """A request was slow to start, a copy was sent to ``backup``, and ``winner`` streamed
    first (the other copy was closed). Sent when the race is decided."""

    type: Literal["hedge"] = field(default="hedge", init=False)
    role: Literal["proposer", "aggregator"]
    layer: int
    index: int
    agent: str
    backup: str
    after_s: float
    winner: Literal["primary", "backup"] | None
    t: float


@dataclass(frozen=True, slots=True)
class AgentReport:
    """What one request of the run did. ``role`` is ``proposer`` or ``aggregator``; times are
    seconds since the run started (``started_s``) or since the request started (``ttft_s``).
    ``request_id`` is the upstream's id of the request (of its last attempt, after retries), when
    the provider's response carried one: it names the request in the upstream's own logs."""

    agent: str
    model: str
    provider: str
    role: Literal["proposer", "aggregator"]
    layer: int
    index: int
    status: Literal["complete", "partial", "failed", "cancelled"]
    started_s: float
    ttft_s: float | None
    duration_s: float | None
    usage: Usage
    chars: int
    error: str | None = None
    hedge: HedgeInfo | None = None
    request_id: str | None = None


@dataclass(frozen=True, slots=True)
class LayerReport:
    layer: int
    reason: LayerEndReason
    decided_s: float
    references: tuple[ReferenceInfo, ...]
    cut: Literal["agreement", "budget"] | None = None
    agreement: float | None = None
    fallback: str | None = None


@dataclass(frozen=True, slots=True)
class RunReport:
    """The whole run.

    ``ttft_s``: run start to the first aggregator token at the caller. ``time_to_quorum_s``:
    run start to the first layer's decision. ``aggregator_ttft_s``: the answering aggregator's
    own TTFT, from its request. ``hedges`` counts the requests that were hedged (each agent's
    ``hedge`` says more; the extra requests' usage is in its usage). ``usage`` adds up every
    request, cancelled ones included (their completion tokens counted from what arrived), as
    their providers count them. In the ``run.done`` event, proposers of ``keep`` layers may
    still be running (status ``partial``): their figures so far are included and marked
    estimated; ``MoARun.report`` after the run closed has their final figures.
    """

    text: str
    aggregator: str | None
    ttft_s: float | None
    time_to_quorum_s: float | None
    aggregator_ttft_s: float | None
    total_s: float
    usage: Usage
    layers: tuple[LayerReport, ...]
    agents: tuple[AgentReport, ...]
    finish_reason: str | None = None
    error: str | None = None
    hedges: int = 0


@dataclass(frozen=True, slots=True)
class RunDone:
    type: Literal["run.done"] = field(default="run.done", init=False)
    report: RunReport
    t: float


Event = (
    ProposerStarted
    | ProposerDelta
    | ProposerDone
    | ProposerFailed
    | LayerDone
    | AggregatorStarted
    | AggregatorDelta
    | AggregatorStep
    | AggregatorStepRejected
    | AggregatorFailed
    | AggregatorDone
    | Hedged
    | RunDone
)
