"""One record per upstream call, and the state of a layer of proposers: a pure state machine.

:class:`Call` is the single record the run keeps of each request it sends (proposer or
aggregator): its text, counts, status, timings, and the handles of its stream and task. The
layer's state, the events, the run report and the accounting all read it; nothing else keeps a
copy.

:class:`LayerState` is fed what happens (``on_delta``, ``on_done``, ``on_failed``, ``on_tick``)
with the time it happened, and updates the calls' records. :meth:`LayerState.decide` asks the
policy once, after everything that arrived together has been fed in, and returns a
:class:`Decision` once the layer should move on. It does no I/O, so any run can be replayed.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from moa_stream._types import Usage, estimate_tokens
from moa_stream.engine.events import HedgeInfo, LayerEndReason, ReferenceStatus
from moa_stream.engine.policies import Policy, WaitAll, relax

if TYPE_CHECKING:
    import asyncio

    from moa_stream.providers import ProviderStream

__all__ = ["Call", "CallStatus", "Decision", "LayerState", "Reference", "UsableAnswer"]

#: What a call is doing: ``running`` until its answer ends; then ``complete`` (it finished),
#: ``failed`` (an error, or an answer that is not usable) or ``cancelled`` (the run closed it).
CallStatus = Literal["running", "complete", "failed", "cancelled"]


_SENTENCE_END = re.compile(r"[.!?;]\s|\n")


def last_sentence_end(text: str) -> int:
    """End of the last sentence end or line break in ``text`` (0: none). Searched from the end
    in growing windows: the staircase asks it at every step boundary, of texts that only grow."""
    end = len(text)
    window = 256
    while True:
        start = max(0, end - window)
        cut = 0
        for match in _SENTENCE_END.finditer(text, start):
            cut = match.end()
        if cut or start == 0:
            return cut
        window *= 4


@dataclass(frozen=True, slots=True)
class UsableAnswer:
    """What a finished answer needs in order to count as complete.

    An answer that fails this counts as failed for the policy (a quorum never counts it) and
    goes to the next step marked failed: an empty answer, or one stopped by a content filter,
    says nothing the next step can build on. An answer cut by ``max_tokens`` (``length``)
    counts as complete: it is handed over up to its last sentence end (see
    :attr:`Call.reference_text`). Proposers' ``max_tokens`` is usually set to bound their
    latency, and a real model's answers often run past it, so refusing cut answers would throw
    away most references. Refuse them with ``UsableAnswer(finish_reasons=("stop",))``.
    ``finish_reasons=None`` accepts any finish reason (and none).
    """

    min_chars: int = 1
    finish_reasons: Collection[str] | None = ("stop", "length")

    def problem(self, text: str, finish_reason: str | None) -> str | None:
        """Why the answer is not usable, or ``None`` when it is."""
        if len(text.strip()) < self.min_chars:
            return "empty answer" if not text.strip() else "answer too short"
        if self.finish_reasons is not None and finish_reason not in self.finish_reasons:
            return f"unusable answer: finish_reason {finish_reason!r}"
        return None


class Call:
    """Everything the run knows about one upstream request.

    ``parts`` holds the content pieces in arrival order (read :attr:`text`); ``chunks`` counts
    them. ``pending`` is the hand-off from the task reading the stream to the run: pieces read
    but not yet taken in (see ``run.py``). ``outcome`` is set by the reading task when the
    answer ended (``complete`` or ``failed``), and applied to ``status`` by the run.
    """

    __slots__ = (
        "agent",
        "chunks",
        "ended_at",
        "error",
        "exc",
        "finish_reason",
        "first_token_at",
        "hedge_reported",
        "index",
        "layer",
        "model",
        "outcome",
        "parts",
        "pending",
        "prompt_chars",
        "provider",
        "queued",
        "role",
        "started_at",
        "status",
        "stream",
        "task",
    )

    def __init__(
        self,
        agent: str,
        index: int,
        *,
        role: Literal["proposer", "aggregator"] = "proposer",
        layer: int = 0,
        model: str = "",
        provider: str = "",
        started_at: float = 0.0,
        prompt_chars: int = 0,
    ) -> None:
        self.agent = agent
        self.index = index
        self.role: Literal["proposer", "aggregator"] = role
        self.layer = layer
        self.model = model
        self.provider = provider
        self.started_at = started_at
        self.prompt_chars = prompt_chars
        self.status: CallStatus = "running"
        self.parts: list[str] = []
        self.chunks = 0
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.exc: BaseException | None = None
        self.first_token_at: float | None = None
        self.ended_at: float | None = None
        self.pending: list[str] = []
        self.queued = False
        self.hedge_reported = False
        self.outcome: CallStatus = "running"
        self.stream: ProviderStream | None = None
        self.task: asyncio.Task[Any] | None = None

    def __repr__(self) -> str:
        return f"<Call {self.role} {self.agent!r} layer={self.layer} status={self.status}>"

    @property
    def text(self) -> str:
        parts = self.parts
        if len(parts) > 1:
            # Join once and keep the result, so repeated reads cost nothing.
            parts[:] = ["".join(parts)]
        return parts[0] if parts else ""

    @property
    def chars(self) -> int:
        return len(self.text)

    @property
    def reference_text(self) -> str:
        """The text handed to the next step: :attr:`text`, or for an answer cut by
        ``max_tokens`` (``finish_reason`` ``length``) its text up to its last sentence end or
        line break, so that a quoted reference does not stop mid-sentence (all of it when it has
        none)."""
        text = self.text
        if self.finish_reason != "length" or text.rstrip().endswith((".", "!", "?")):
            return text
        cut = last_sentence_end(text)
        return text[:cut].rstrip() if cut else text

    @property
    def hedge(self) -> HedgeInfo | None:
        """The hedge of this call's request, if one was sent."""
        return getattr(self.stream, "hedge", None)

    @property
    def request_id(self) -> str | None:
        """The upstream's id of this call's request, if its response named one. Read when the
        report is built, never while streaming; providers without the attribute give ``None``."""
        value = getattr(self.stream, "request_id", None)
        return value if isinstance(value, str) else None

    def usage(self) -> Usage:
        """The provider's figures (the server's count when it sent one, else the provider's
        estimate); the package's estimate only when the provider has none yet."""
        stream = self.stream
        if stream is not None:
            usage = stream.usage
            if usage is not None:
                return usage
        return Usage(
            estimate_tokens(self.prompt_chars), estimate_tokens(self.chars), estimated=True
        )


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
    so), cancelled or not-yet-started ones left out. ``usable`` counts complete + partial.
    ``fallback`` is the rule the layer fell back to when its policy could no longer be met."""

    reason: LayerEndReason
    references: tuple[Reference, ...]
    at: float
    fallback: Policy | None = None

    @property
    def usable(self) -> int:
        return sum(1 for r in self.references if r.status != "failed")


class LayerState:
    """Tracks one layer; asks its policy when :meth:`decide` is called.

    It implements :class:`moa_stream.engine.policies.LayerStatus` for the policy to read.
    ``decision`` is set once; later inputs only update the records.

    When the policy can no longer be met (too many failures) and ``degrade`` is true, the layer
    falls back to the same rule with ``k`` lowered to what is still reachable (so it waits for
    the survivors instead of dropping them) and reports reason ``degraded``. With
    ``degrade=False`` it decides ``degraded`` at once, for the run to raise.
    """

    def __init__(
        self,
        agents: Sequence[str] | Sequence[Call],
        policy: Policy,
        started_at: float,
        *,
        usable: UsableAnswer | None = None,
        degrade: bool = True,
    ) -> None:
        self.calls: list[Call] = [
            a if isinstance(a, Call) else Call(str(a), i) for i, a in enumerate(agents)
        ]
        self.policy = policy
        self.usable = usable or UsableAnswer()
        self.degrade = degrade
        self.started_at = started_at
        self.now = started_at
        self.done = 0
        self.failed = 0
        self.decision: Decision | None = None
        self.fallback: Policy | None = None
        self._tokens = [0] * len(self.calls)
        self._finished = [False] * len(self.calls)

    # -- LayerStatus -------------------------------------------------------------------------
    @property
    def n(self) -> int:
        return len(self.calls)

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
    def on_delta(self, index: int, text: str, now: float) -> None:
        call = self.calls[index]
        if call.status != "running":
            return
        call.parts.append(text)
        call.chunks += 1
        self._tokens[index] = call.chunks
        self.now = now

    def on_done(self, index: int, now: float, finish_reason: str | None = "stop") -> None:
        """The answer ended; it counts as complete only if it is usable."""
        call = self.calls[index]
        if call.status != "running":
            return
        call.finish_reason = finish_reason
        problem = self.usable.problem(call.text, finish_reason)
        if problem is not None:
            self._fail(index, problem)
        else:
            call.status = "complete"
            self.done += 1
            self._finished[index] = True
        self.now = now

    def on_failed(self, index: int, error: str, now: float) -> None:
        if self.calls[index].status != "running":
            return
        self._fail(index, error)
        self.now = now

    def on_tick(self, now: float) -> None:
        """Time passed (a deadline timer)."""
        if now > self.now:
            self.now = now

    def _fail(self, index: int, error: str) -> None:
        call = self.calls[index]
        call.status = "failed"
        call.error = error
        self.failed += 1
        self._tokens[index] = (
            0  # a failed proposer's text is never used: policies must not count it
        )

    def cancel_running(self) -> list[int]:
        """Mark every running proposer cancelled; returns their indexes."""
        cancelled = []
        for call in self.calls:
            if call.status == "running":
                call.status = "cancelled"
                cancelled.append(call.index)
        return cancelled

    def next_check_at(self) -> float | None:
        """Absolute time at which the policy must be asked again, if any."""
        if self.decision is not None:
            return None
        t = (self.fallback or self.policy).next_check(self)
        return None if t is None else self.started_at + t

    # -- decision ----------------------------------------------------------------------------
    def decide(self) -> Decision | None:
        """Ask the policy (or the rule it fell back to) once; the decision, if it fires."""
        if self.decision is not None:
            return self.decision
        policy = self.fallback or self.policy
        if self.fallback is None and policy.unreachable(self):
            if not self.degrade or self.running == 0:
                self.decision = self._decide("degraded", partial=False)
                return self.decision
            policy = relax(policy, self.done + self.running)
            if policy.unreachable(self):
                policy = WaitAll()
            self.fallback = policy
        fire = policy.check(self)
        if fire is not None:
            reason = "degraded" if self.fallback is not None else fire.reason
            self.decision = self._decide(reason, fire.partial)
        elif self.running == 0:
            self.decision = self._decide("degraded", partial=False)
        return self.decision

    def _decide(self, reason: LayerEndReason, partial: bool) -> Decision:
        """The references; a layer that has none usable is ``degraded`` whatever fired."""
        refs: list[Reference] = []
        usable = False
        for call in self.calls:
            status = call.status
            if status == "complete":
                refs.append(Reference(call.agent, call.index, "complete", call.reference_text))
                usable = True
            elif status == "failed":
                refs.append(Reference(call.agent, call.index, "failed", ""))
            elif status == "running" and partial and call.chunks > 0:
                refs.append(Reference(call.agent, call.index, "partial", call.text))
                usable = True
        return Decision(reason if usable else "degraded", tuple(refs), self.now, self.fallback)
