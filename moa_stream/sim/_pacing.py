"""When each piece of a reply goes out: the simulator's pacing, shared by its routes.

A request's plan (:mod:`moa_stream.sim._plan`) holds, from the model's seeded latency profile,
the time of every token (offsets from the start of generation), of the finish, and of any
fault. Pacing turns that into writes: generation starts once the model has a free slot, and a
streamed reply then only sleeps until the next due time and writes every token due by then in
one ``write``, so timing does not drift and per-chunk work stays tiny under load. What those
bytes are is the route's: a :class:`StreamEncoder` per reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Final, Protocol

from aiohttp import web

from moa_stream.sim._ledger import SimRecord, note_done
from moa_stream.sim._plan import Plan
from moa_stream.sim.profiles import SimModel

__all__ = ["Pacer", "StreamEncoder", "abort", "event_stream", "sleep_until"]

#: The faults that act on the wire of a stream at a token index (stalls are in the offsets).
_WIRE_FAULTS: Final = frozenset({"reset_mid", "malformed", "error_frame"})


async def sleep_until(when: float) -> None:
    """Sleep until ``when`` on ``time.monotonic()``; not at all if it has passed."""
    delay = when - time.monotonic()
    if delay > 0.0:
        await asyncio.sleep(delay)


def abort(request: web.BaseRequest) -> None:
    """Drop the connection at once, as a server that crashed mid-reply does."""
    transport = request.transport
    if transport is not None:
        transport.abort()


def event_stream(id_header: str, request_id: str) -> web.StreamResponse:
    """The response of a streamed reply, before its headers go out."""
    return web.StreamResponse(
        status=200,
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            id_header: request_id,
        },
    )


class StreamEncoder(Protocol):
    """A route's wire format for one streamed reply, written by :meth:`Pacer.stream`.

    ``opening`` is written as soon as the headers are out, ``started`` when generation starts,
    ``head`` together with the first write of the reply whatever it is (tokens, the end, or an
    error). ``keepalive`` goes with every write, and every interval while waiting, when the plan
    asks for keep-alives. ``tokens`` encodes a run of content tokens (``first``: the reply's
    first), ``tail`` the end of the reply (``first``: no token went before it); ``now`` is when
    they are written. ``error`` is the error a stream breaks off with, ``malformed`` a chunk the
    client cannot parse.
    """

    opening: bytes
    started: bytes
    head: Sequence[bytes]
    keepalive: bytes

    def tokens(self, tokens: Sequence[str], first: bool, now: float) -> Iterable[bytes]: ...

    def tail(self, first: bool, now: float) -> Iterable[bytes]: ...

    def error(self) -> bytes: ...

    def malformed(self) -> bytes: ...


class Pacer:
    """The simulator's clock for replies: each model's slots (the replies it generates at
    once, when it has a limit), and the schedule a streamed reply is written on."""

    __slots__ = ("_slots",)

    def __init__(self) -> None:
        self._slots: dict[str, asyncio.Semaphore] = {}

    def start(self, models: Iterable[SimModel]) -> None:
        """Give every model with a limit its slots (the server starts serving)."""
        self._slots = {m.name: asyncio.Semaphore(m.slots) for m in models if m.slots}

    def add(self, model: SimModel) -> None:
        """Give a model added while serving its slots."""
        if model.slots is not None:
            self._slots[model.name] = asyncio.Semaphore(model.slots)

    @contextlib.asynccontextmanager
    async def generation(
        self, record: SimRecord, model: SimModel, plan: Plan
    ) -> AsyncIterator[float]:
        """Hold one of ``model``'s slots while the reply is generated; the start of generation
        (what the plan's offsets count from), also kept in ``record``."""
        semaphore = self._slots.get(model.name)
        if semaphore is None:
            yield _started(record, plan)
            return
        async with semaphore:
            yield _started(record, plan)

    async def stream(
        self,
        request: web.Request,
        resp: web.StreamResponse,
        record: SimRecord,
        model: SimModel,
        plan: Plan,
        encoder: StreamEncoder,
    ) -> web.StreamResponse:
        """Write the streamed reply ``plan`` describes on ``resp``, as ``encoder`` encodes it.

        Headers go out at once, as real servers send them; the first token waits for a slot
        and for the plan. A client that goes away stops the reply (``"client_disconnected"``).
        """
        try:
            await resp.prepare(request)
            record.status = 200
            if encoder.opening:
                await resp.write(encoder.opening)
            async with self.generation(record, model, plan) as start:
                if encoder.started:
                    await resp.write(encoder.started)
                await _write_reply(request, resp, record, plan, encoder, start)
        except ConnectionError:
            # The write failed: the client is gone. Stop generating and say so.
            record.outcome = "client_disconnected"
        return resp


def _started(record: SimRecord, plan: Plan) -> float:
    start = time.monotonic()
    record.queued_s = start - record.received_at
    record.scheduled_first_token_at = start + plan.first_offset
    record.scheduled_ttft_s = record.scheduled_first_token_at - record.received_at
    return start


async def _wait(resp: web.StreamResponse, when: float, plan: Plan, keepalive: bytes) -> None:
    """Sleep until ``when``; with keep-alives on, write one every interval meanwhile."""
    if plan.keepalive:
        interval = plan.keepalive_interval_s
        while when - time.monotonic() > interval:
            await asyncio.sleep(interval)
            await resp.write(keepalive)
    await sleep_until(when)


async def _write_reply(
    request: web.Request,
    resp: web.StreamResponse,
    record: SimRecord,
    plan: Plan,
    encoder: StreamEncoder,
    start: float,
) -> None:
    tokens = plan.tokens
    n = len(tokens)
    times = [start + offset for offset in plan.offsets]
    end_at = start + plan.end_offset
    fault = plan.fault if plan.fault in _WIRE_FAULTS else None
    k = plan.fault_at
    pending = list(encoder.head)
    keepalive = encoder.keepalive if plan.keepalive else b""
    tail_sent = False
    i = 0
    while True:
        if fault is not None and i == k:
            await _wait(resp, start + plan.event_offset(k), plan, encoder.keepalive)
            if fault == "reset_mid":
                record.outcome = "fault:reset_mid"
                abort(request)
                return
            if fault == "error_frame":
                record.outcome = "fault:error_frame"
                await resp.write(b"".join(pending) + encoder.error())
                await resp.write_eof()
                return
            pending.append(encoder.malformed())
            fault = None
        if i >= n:
            break
        await _wait(resp, times[i], plan, encoder.keepalive)
        now = time.monotonic()
        # Coalesce every token already due into one write (up to a pending fault).
        limit = k if fault is not None else n
        j = i + 1
        while j < limit and times[j] <= now:
            j += 1
        parts, pending = pending, []
        if keepalive:
            parts.append(keepalive)
        if i == 0:
            record.first_token_sent_at = now
        parts.extend(encoder.tokens(tokens[i:j], i == 0, now))
        if j == n and end_at <= now:
            parts.extend(encoder.tail(False, now))
            tail_sent = True
        await resp.write(b"".join(parts))
        record.last_token_sent_at = now
        record.completion_tokens = j
        i = j
    if not tail_sent:
        await _wait(resp, end_at, plan, encoder.keepalive)
        now = time.monotonic()
        parts = pending
        if keepalive:
            parts.append(keepalive)
        if n == 0:
            record.first_token_sent_at = now
        parts.extend(encoder.tail(n == 0, now))
        await resp.write(b"".join(parts))
    await resp.write_eof()
    note_done(record, plan)
