"""The simulator's request ledger: what it keeps of every request, whichever route served it.

One :class:`SimRecord` per request (listed as soon as the request arrives, filled in as it
goes), the requests in flight and the streams being written, how often each request was seen
before (a retry's ``occurrence``, the ``times`` of a forced fault) and what each model's prefix
cache holds. The routes (:mod:`moa_stream.sim._openai`, :mod:`moa_stream.sim._anthropic`) write
into it; :class:`~moa_stream.sim.server.SimServer` reads it out.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from array import array
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from moa_stream.sim._continue import ContinuationInfo, PrefixCache
from moa_stream.sim._plan import ParsedRequest, Plan, build_plan
from moa_stream.sim.profiles import FaultKind, SimModel

__all__ = ["Ledger", "Outcome", "SimRecord", "note_done"]

#: How a request ended: ``"complete"``; ``"client_disconnected"`` (the client went away first);
#: ``"fault:<kind>"`` (a fault was injected and the request ran to the end that fault gave it,
#: including benign ones such as ``fault:keepalive``); ``"error"`` (refused as invalid, unknown
#: model, or cut off by the server shutting down). ``None`` while in progress.
Outcome = str

# Bounds for the per-request bookkeeping that is keyed by prompt, so a long benchmark with
# unique prompts cannot grow memory without limit.
_MAX_TRACKED_KEYS = 65_536


@dataclass(slots=True)
class SimRecord:
    """What happened to one chat-completions request. Times are ``time.monotonic()`` seconds.

    Filled in as the request progresses (the record is listed as soon as the request arrives).
    ``queued_s`` runs from arrival to the start of generation (reading the body, and waiting for
    a slot when the model has ``slots``). ``scheduled_first_token_at`` is when the plan put the
    first token (queueing included);
    ``scheduled_ttft_s`` is that minus ``received_at``. ``completion_tokens`` counts the content
    tokens actually written. ``fault`` names the injected fault, if any; ``question_id`` and
    ``answer`` are set for quiz prompts. ``continuation`` says what the request continued
    (``"prefill"``, ``"turns"`` or None) and ``continuation_flaws`` how the reply failed to
    continue it exactly (``"restart"``, ``"early_stop"``, ``"markup"``, ``"refused"``; see
    :class:`~moa_stream.sim.profiles.ContinuationProfile`).

    The plan, for whoever wants to know when the reply was due (a benchmark's oracle), with
    offsets in seconds after generation started (``received_at + queued_s``):
    ``token_offsets[i]`` is when content token ``i`` was due, ``token_chars[i]`` its length in
    characters (the reply may have stopped sooner), ``end_offset`` when the finish chunk was due
    (both compact arrays: a record outlives its reply, the text need not).
    ``fault_at`` counts the content tokens sent before a mid-stream fault; ``retry_after_s`` is
    what a 429 asked the client to wait. ``repeat_key`` is equal for requests the simulator
    treats as the same one (model, messages and sample), ``occurrence`` says how many of them
    came before this one: a retry's earlier attempts are the records with its key and lower
    occurrences.
    """

    request_id: str
    received_at: float
    model: str = ""
    stream: bool = False
    status: int | None = None
    outcome: Outcome | None = None
    fault: str | None = None
    queued_s: float | None = None
    scheduled_first_token_at: float | None = None
    scheduled_ttft_s: float | None = None
    first_token_sent_at: float | None = None
    last_token_sent_at: float | None = None
    finished_at: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    question_id: str | None = None
    answer: int | None = None
    cached_tokens: int = 0
    continuation: str | None = None
    continuation_flaws: tuple[str, ...] = ()
    token_offsets: Sequence[float] = ()
    token_chars: Sequence[int] = ()
    end_offset: float | None = None
    fault_at: int = 0
    retry_after_s: float | None = None
    repeat_key: str = ""
    occurrence: int = 0

    @property
    def ttft_s(self) -> float | None:
        """Actual seconds from arrival to the first token written, if one was."""
        if self.first_token_sent_at is None:
            return None
        return self.first_token_sent_at - self.received_at


def note_done(record: SimRecord, plan: Plan) -> None:
    """Record a reply that went out in full: its finish reason, and its planned fault."""
    record.finish_reason = plan.finish_reason
    record.outcome = f"fault:{plan.fault_label}" if plan.fault_label else "complete"


class _BoundedCounts:
    """Counters by key that forget the least recently used keys beyond ``maxsize``."""

    __slots__ = ("_counts", "_maxsize")

    def __init__(self, maxsize: int = _MAX_TRACKED_KEYS) -> None:
        self._counts: dict[Hashable, int] = {}
        self._maxsize = maxsize

    def bump(self, key: Hashable) -> int:
        """Return how often ``key`` was seen before, and count this time."""
        seen = self._counts.pop(key, 0)
        self._counts[key] = seen + 1
        if len(self._counts) > self._maxsize:
            del self._counts[next(iter(self._counts))]
        return seen


class Ledger:
    """Every request's record and the counts kept across requests. ``records_maxlen`` bounds
    the records (oldest dropped first; None keeps everything)."""

    __slots__ = (
        "_caches",
        "_closed",
        "_forced",
        "_idle",
        "_occurrences",
        "_records",
        "_tasks",
        "active_streams",
        "in_flight",
    )

    def __init__(self, records_maxlen: int | None) -> None:
        self._records: deque[SimRecord] = deque(maxlen=records_maxlen)
        self._occurrences = _BoundedCounts()
        self._forced = _BoundedCounts()
        self._caches: dict[str, PrefixCache] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False
        #: requests whose handler has not finished
        self.in_flight = 0
        #: streamed replies being written
        self.active_streams = 0

    @property
    def records(self) -> list[SimRecord]:
        """A snapshot of the records, oldest first (records in progress included)."""
        return list(self._records)

    def clear(self) -> None:
        """Forget all records."""
        self._records.clear()

    async def track(
        self,
        request: web.Request,
        serve: Callable[[web.Request, SimRecord], Awaitable[web.StreamResponse]],
        request_id: str,
    ) -> web.StreamResponse:
        """Serve one request with ``serve`` under a new record: counted in flight (for
        :meth:`wait_idle`), its handler task known (for :meth:`cut_off`), and its outcome set
        even when it ends by a disconnect or an error. Every route goes through here."""
        record = SimRecord(request_id=request_id, received_at=time.monotonic())
        self._records.append(record)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self.in_flight += 1
        self._idle.clear()
        try:
            return await serve(request, record)
        except asyncio.CancelledError:
            if record.outcome is None:
                record.outcome = "error" if self._closed else "client_disconnected"
            raise
        except BaseException:
            if record.outcome is None:
                record.outcome = "error"
            raise
        finally:
            if record.finished_at is None:
                record.finished_at = time.monotonic()
            if task is not None:
                self._tasks.discard(task)
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()

    @contextlib.contextmanager
    def streaming(self) -> Iterator[None]:
        """Count a streamed reply as active while it is written."""
        self.active_streams += 1
        try:
            yield
        finally:
            self.active_streams -= 1

    async def wait_idle(self) -> None:
        """Wait until no request is being handled."""
        while self.in_flight:
            await self._idle.wait()

    def close(self) -> None:
        """The server is closing: a request cut off from now on ends as ``"error"``."""
        self._closed = True

    async def cut_off(self) -> None:
        """Cancel every request in progress and wait for them."""
        tasks = [t for t in self._tasks if not t.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def prefix_cache(self, model: SimModel) -> PrefixCache:
        """What ``model``'s server keeps cached of earlier prompts and replies."""
        cache = self._caches.get(model.name)
        if cache is None:
            cache = self._caches[model.name] = PrefixCache()
        return cache

    def plan(
        self,
        record: SimRecord,
        model: SimModel,
        req: ParsedRequest,
        *,
        seed: int,
        continuation: ContinuationInfo,
        cached_chars: int = 0,
    ) -> Plan:
        """Plan the reply to ``req`` (counting it among its repeats) and keep in ``record`` what
        the plan decided, before the reply starts."""
        forced, random_faults = self._forced_fault(req)
        occurrence = self._occurrences.bump((req.model, req.prompt_digest, req.sample))
        plan = build_plan(
            model,
            req,
            seed=seed,
            occurrence=occurrence,
            fault=forced,
            random_faults=random_faults,
            continuation=continuation,
            cached_chars=cached_chars,
        )
        record.prompt_tokens = plan.prompt_tokens
        record.cached_tokens = plan.cached_tokens
        record.continuation = plan.continuation
        record.continuation_flaws = plan.continuation_flaws
        record.fault = plan.fault_label
        record.question_id = plan.question_id
        record.answer = plan.answer
        record.token_offsets = array("d", plan.offsets)
        record.token_chars = array("I", map(len, plan.tokens))
        record.end_offset = plan.end_offset
        record.fault_at = plan.fault_at
        record.retry_after_s = plan.retry_after_s if plan.fault == "rate_limit" else None
        record.repeat_key = req.repeat_key
        record.occurrence = occurrence
        return plan

    def _forced_fault(self, req: ParsedRequest) -> tuple[FaultKind | None, bool]:
        """The fault the request's ``sim`` field forces, and whether random faults may apply.

        With ``times`` or ``key`` only the first ``times`` (default 1) requests sharing the key
        (default: same model and messages) get the fault; later ones succeed cleanly.
        """
        sim = req.sim
        if sim is None or sim.fault is None:
            return None, True
        if sim.times is None and sim.key is None:
            return sim.fault, False
        key = sim.key if sim.key is not None else (req.model, req.prompt_digest)
        times = 1 if sim.times is None else sim.times
        seen = self._forced.bump(("forced", key))
        return (sim.fault if seen < times else None), False
