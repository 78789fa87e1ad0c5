"""The state of one layer of proposers: a pure state machine, no I/O.

The runner feeds it what happens (``on_delta``, ``on_done``, ``on_failed``, ``on_tick``) with
the time it happened; each call returns a :class:`Decision` once the layer should move on.
Every proposer's text so far is kept, so the next step can take complete answers, partial ones,
or refresh a partial aggregation later from newer text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from moa_stream.engine.events import LayerEndReason, ReferenceInfo, ReferenceStatus
from moa_stream.engine.policies import Policy

__all__ = ["Decision", "LayerState", "ProposerSlot", "Reference"]

SlotState = Literal["running", "done", "failed", "cancelled"]


@dataclass(slots=True)
class ProposerSlot:
    """One proposer's progress. ``parts`` are its content pieces in arrival order."""

    agent: str
    index: int
    state: SlotState = "running"
    tokens: int = 0
    error: str | None = None
    parts: list[str] = field(default_factory=list, repr=False)

    @property
    def text(self) -> str:
        if len(self.parts) > 1:
            # Join once and keep the result, so repeated reads cost nothing.
            self.parts[:] = ["".join(self.parts)]
        return self.parts[0] if self.parts else ""


@dataclass(frozen=True, slots=True)
class Reference:
    """A proposer's answer as handed to the next step."""

    agent: str
    index: int
    status: ReferenceStatus
    text: str


@dataclass(frozen=True, slots=True)
class Decision:
    """The layer moves on. ``references`` are in proposer order, failed ones included (marked
    so), cancelled or not-yet-started ones left out. ``usable`` counts complete + partial."""

    reason: LayerEndReason
    references: tuple[Reference, ...]
    at: float

    @property
    def usable(self) -> int:
        return sum(1 for r in self.references if r.status in ("complete", "partial"))

    def infos(self) -> tuple[ReferenceInfo, ...]:
        return tuple(
            ReferenceInfo(r.agent, r.index, r.status, len(r.text), _approx_tokens(r.text))
            for r in self.references
        )


def _approx_tokens(text: str) -> int:
    return (len(text) + 3) // 4


class LayerState:
    """Tracks one layer and asks its policy after every change.

    It implements :class:`moa_stream.engine.policies.LayerStatus` for the policy to read.
    ``decision`` is set once, by the first call that makes the policy fire (or that makes it
    unreachable: reason ``degraded``); later calls only update the record.
    """

    def __init__(self, agents: Sequence[str], policy: Policy, started_at: float) -> None:
        self.slots = [ProposerSlot(a, i) for i, a in enumerate(agents)]
        self.policy = policy
        self.started_at = started_at
        self.now = started_at
        self.done = 0
        self.failed = 0
        self.decision: Decision | None = None
        self._tokens = [0] * len(self.slots)
        self._finished = [False] * len(self.slots)

    # -- LayerStatus -------------------------------------------------------------------------
    @property
    def n(self) -> int:
        return len(self.slots)

    @property
    def elapsed(self) -> float:
        return self.now - self.started_at

    @property
    def tokens(self) -> Sequence[int]:
        return self._tokens

    @property
    def finished(self) -> Sequence[bool]:
        return self._finished

    @property
    def running(self) -> int:
        return self.n - self.done - self.failed

    # -- inputs ------------------------------------------------------------------------------
    def on_delta(self, index: int, text: str, now: float) -> Decision | None:
        slot = self.slots[index]
        if slot.state != "running":
            return None
        slot.parts.append(text)
        slot.tokens += 1
        self._tokens[index] = slot.tokens
        if self.decision is not None:
            return None
        self.now = now
        return self._evaluate()

    def on_done(self, index: int, now: float) -> Decision | None:
        slot = self.slots[index]
        if slot.state != "running":
            return None
        slot.state = "done"
        self.done += 1
        self._finished[index] = True
        if self.decision is not None:
            return None
        self.now = now
        return self._evaluate()

    def on_failed(self, index: int, error: str, now: float) -> Decision | None:
        slot = self.slots[index]
        if slot.state != "running":
            return None
        slot.state = "failed"
        slot.error = error
        self.failed += 1
        self._tokens[index] = (
            0  # a failed proposer's text is never used: policies must not count it
        )
        if self.decision is not None:
            return None
        self.now = now
        return self._evaluate()

    def on_tick(self, now: float) -> Decision | None:
        """Time passed with nothing else happening (a deadline timer)."""
        if self.decision is not None:
            return None
        self.now = max(self.now, now)
        return self._evaluate()

    def cancel_running(self) -> list[int]:
        """Mark every running proposer cancelled; returns their indexes."""
        cancelled = []
        for slot in self.slots:
            if slot.state == "running":
                slot.state = "cancelled"
                cancelled.append(slot.index)
        return cancelled

    def next_check_at(self) -> float | None:
        """Absolute time at which the policy must be asked again, if any."""
        if self.decision is not None:
            return None
        t = self.policy.next_check(self)
        return None if t is None else self.started_at + t

    # -- decision ----------------------------------------------------------------------------
    def _evaluate(self) -> Decision | None:
        fire = self.policy.check(self)
        if fire is not None:
            self.decision = self._decide(fire.reason, fire.partial)
        elif self.running == 0 or self.policy.unreachable(self):
            self.decision = self._decide("degraded", partial=False)
        return self.decision

    def _decide(self, reason: LayerEndReason, partial: bool) -> Decision:
        refs: list[Reference] = []
        for slot in self.slots:
            if slot.state == "done":
                refs.append(Reference(slot.agent, slot.index, "complete", slot.text))
            elif slot.state == "failed":
                refs.append(Reference(slot.agent, slot.index, "failed", ""))
            elif slot.state == "running" and partial and slot.tokens > 0:
                refs.append(Reference(slot.agent, slot.index, "partial", slot.text))
        return Decision(reason, tuple(refs), self.now)
