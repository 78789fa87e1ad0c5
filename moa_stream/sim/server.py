"""The simulated upstream: a real aiohttp server speaking OpenAI chat completions.

One process hosts any number of named :class:`~moa_stream.sim.profiles.SimModel`. Each request
is planned up front (:mod:`moa_stream.sim._plan`): its text, the absolute time of every token
and any fault. The handler then only sleeps until the next due time and writes every chunk due
by then in one ``write``, so timing does not drift and per-chunk work stays tiny under load.

All timestamps are ``time.monotonic()`` (CLOCK_MONOTONIC, shared by every process on the
machine), so a benchmark in another process can compare them with its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import secrets
import time
from array import array
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType, TracebackType
from typing import Any, Literal

import orjson
from aiohttp import web

from moa_stream._exceptions import ConfigError
from moa_stream.sim._anthropic import MessagesRoute
from moa_stream.sim._continue import PrefixCache, detect_continuation, render_prompt
from moa_stream.sim._flaws import PREFILL_REFUSAL
from moa_stream.sim._overflow import overflow_response
from moa_stream.sim._plan import (
    ParsedRequest,
    Plan,
    RequestError,
    build_plan,
    parse_request,
)
from moa_stream.sim._wire import (
    DONE,
    KEEPALIVE,
    ChunkEncoder,
    completion_body,
    error_body,
    error_frame,
)
from moa_stream.sim.profiles import FaultKind, SimModel, default_models

__all__ = ["Outcome", "SimRecord", "SimServer"]

#: How a request ended: ``"complete"``; ``"client_disconnected"`` (the client went away first);
#: ``"fault:<kind>"`` (a fault was injected and the request ran to the end that fault gave it,
#: including benign ones such as ``fault:keepalive``); ``"error"`` (refused as invalid, unknown
#: model, or cut off by the server shutting down). ``None`` while in progress.
Outcome = str

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Bounds for the per-request bookkeeping that is keyed by prompt, so a long benchmark with
# unique prompts cannot grow memory without limit.
_MAX_TRACKED_KEYS = 65_536


def _new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


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

    def _take_plan(self, plan: Plan, repeat_key: str, occurrence: int) -> None:
        """Keep what a plan decided (once per request, before the reply starts)."""
        self.prompt_tokens = plan.prompt_tokens
        self.cached_tokens = plan.cached_tokens
        self.continuation = plan.continuation
        self.continuation_flaws = plan.continuation_flaws
        self.fault = plan.fault_label
        self.question_id = plan.question_id
        self.answer = plan.answer
        self.token_offsets = array("d", plan.offsets)
        self.token_chars = array("I", map(len, plan.tokens))
        self.end_offset = plan.end_offset
        self.fault_at = plan.fault_at
        self.retry_after_s = plan.retry_after_s if plan.fault == "rate_limit" else None
        self.repeat_key = repeat_key
        self.occurrence = occurrence

    @property
    def ttft_s(self) -> float | None:
        """Actual seconds from arrival to the first token written, if one was."""
        if self.first_token_sent_at is None:
            return None
        return self.first_token_sent_at - self.received_at


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


async def _sleep_until(when: float) -> None:
    delay = when - time.monotonic()
    if delay > 0.0:
        await asyncio.sleep(delay)


def _json_response(
    body: bytes, status: int, request_id: str, headers: dict[str, str] | None = None
) -> web.Response:
    all_headers = {"x-request-id": request_id}
    if headers:
        all_headers.update(headers)
    return web.Response(
        body=body, status=status, content_type="application/json", headers=all_headers
    )


def _error_response(exc: RequestError, request_id: str) -> web.Response:
    return _json_response(
        error_body(exc.message, exc.error_type, exc.code, exc.param), exc.status, request_id
    )


def _abort(request: web.BaseRequest) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


@web.middleware
async def _openai_errors(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """Unknown routes and methods get OpenAI error bodies too, not aiohttp's plain text."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.status == 404:
            message, code = f"Unknown request URL: {request.method} {request.path}.", "unknown_url"
        elif exc.status == 405:
            message = f"Method {request.method} is not allowed for {request.path}."
            code = "method_not_allowed"
        else:
            message, code = exc.reason, None
        body = error_body(message, "invalid_request_error", code)
        return _json_response(body, exc.status, _new_id("req_"))


async def _add_request_id(request: web.Request, response: web.StreamResponse) -> None:
    if "x-request-id" not in response.headers:
        response.headers["x-request-id"] = _new_id("req_")


class SimServer:
    """A simulated OpenAI-compatible upstream hosting ``models`` (default:
    :func:`~moa_stream.sim.profiles.default_models`).

    Use it as an async context manager, or call :meth:`start` and :meth:`aclose` (both
    idempotent). ``port=0`` picks a free port; read :attr:`base_url` after starting.
    ``seed`` makes text, timing and faults reproducible. ``records_maxlen`` bounds
    :attr:`records` (oldest dropped first; None keeps everything).

    Closing does not wait for streams in progress: they are cut off and recorded as ``"error"``.
    """

    def __init__(
        self,
        models: Iterable[SimModel] | None = None,
        *,
        seed: int = 0,
        host: str = "127.0.0.1",
        port: int = 0,
        records_maxlen: int | None = 10_000,
        created: int | None = None,
    ) -> None:
        self._state: Literal["new", "running", "closed"] = "new"
        self._models: dict[str, SimModel] = {}
        for model in default_models() if models is None else models:
            self.add_model(model)
        self.seed = seed
        self.host = host
        self._port = port
        self._created = int(time.time()) if created is None else created
        self._records: deque[SimRecord] = deque(maxlen=records_maxlen)
        self._lock = asyncio.Lock()
        self._runner: web.AppRunner | None = None
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._handler_tasks: set[asyncio.Task[Any]] = set()
        self._in_flight = 0
        self._active_streams = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._occurrences = _BoundedCounts()
        self._forced = _BoundedCounts()
        self._caches: dict[str, PrefixCache] = {}

    # -- public surface -------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound port (the requested one until started)."""
        return self._port

    @property
    def url(self) -> str:
        """``http://host:port``, without the ``/v1`` prefix."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self._port}"

    @property
    def base_url(self) -> str:
        """The OpenAI base URL: ``http://host:port/v1``."""
        return self.url + "/v1"

    @property
    def models(self) -> MappingProxyType[str, SimModel]:
        """The hosted models by name."""
        return MappingProxyType(self._models)

    @property
    def records(self) -> list[SimRecord]:
        """A snapshot of the request records, oldest first (records in progress included)."""
        return list(self._records)

    @property
    def active_streams(self) -> int:
        """Streaming responses currently being written."""
        return self._active_streams

    @property
    def in_flight(self) -> int:
        """Chat-completions requests whose handler has not finished."""
        return self._in_flight

    @property
    def open_connections(self) -> int:
        """TCP connections currently open to the server."""
        server = None if self._runner is None else self._runner.server
        return 0 if server is None else len(server.connections)

    def add_model(self, model: SimModel) -> None:
        """Host another model (also while running)."""
        if model.name in self._models:
            raise ConfigError(f"duplicate model name {model.name!r}", path="sim.models")
        self._models[model.name] = model
        if self._state == "running" and model.slots is not None:
            self._slots[model.name] = asyncio.Semaphore(model.slots)

    def clear_records(self) -> None:
        """Forget all records."""
        self._records.clear()

    # The timeout is part of this helper's contract: tests call it bare and expect it to end.
    async def wait_idle(
        self,
        timeout: float = 5.0,  # noqa: ASYNC109
        *,
        connections: bool = False,
    ) -> None:
        """Wait until no request is being handled (clients that went away included), and with
        ``connections=True`` also until every connection is closed. ``TimeoutError`` after
        ``timeout`` seconds."""
        async with asyncio.timeout(timeout):
            while self._in_flight:
                await self._idle.wait()
            # aiohttp signals no event when a connection closes, so poll briefly.
            while connections and self.open_connections:  # noqa: ASYNC110
                await asyncio.sleep(0.005)

    def make_app(self) -> web.Application:
        """The aiohttp application (for embedding in another runner)."""
        app = web.Application(middlewares=[_openai_errors], client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self._handle_chat)
        app.router.add_post("/v1/messages", MessagesRoute(self).handle)
        app.router.add_get("/v1/models", self._handle_models)
        app.router.add_get("/v1/models/{model}", self._handle_model)
        app.router.add_get("/health", self._handle_health)
        app.on_response_prepare.append(_add_request_id)
        return app

    async def start(self) -> SimServer:
        """Bind and start serving. Idempotent; a closed server cannot be restarted."""
        async with self._lock:
            if self._state == "running":
                return self
            if self._state == "closed":
                raise RuntimeError("SimServer is closed")
            self._slots = {
                m.name: asyncio.Semaphore(m.slots) for m in self._models.values() if m.slots
            }
            # handler_cancellation: a client that goes away cancels its handler at once, even
            # while it sleeps before the next token. No access log: it costs time under load.
            runner = web.AppRunner(
                self.make_app(), handler_cancellation=True, access_log=None, shutdown_timeout=1.0
            )
            await runner.setup()
            try:
                # A deep backlog: with the default 128, a benchmark opening 256 connections at
                # once loses SYNs and its clients wait a second to retry.
                site = web.TCPSite(runner, self.host, self._port, backlog=1024)
                await site.start()
            except BaseException:
                await runner.cleanup()
                raise
            self._port = int(runner.addresses[0][1])
            self._runner = runner
            self._state = "running"
            return self

    async def aclose(self) -> None:
        """Stop serving and cut off requests in progress. Idempotent."""
        async with self._lock:
            if self._state == "closed":
                return
            self._state = "closed"
            runner, self._runner = self._runner, None
            if runner is None:
                return
            # Stop accepting first, then cancel handlers ourselves: aiohttp's own shutdown would
            # wait for them (a stalled stream for its whole stall).
            for site in list(runner.sites):
                await site.stop()
            tasks = [t for t in self._handler_tasks if not t.done()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await runner.cleanup()

    async def __aenter__(self) -> SimServer:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<SimServer {self.base_url} models={list(self._models)} state={self._state}>"

    # -- handlers --------------------------------------------------------------------------

    async def _handle_health(self, request: web.Request) -> web.Response:
        return _json_response(b'{"status":"ok"}', 200, _new_id("req_"))

    def _model_object(self, model: SimModel) -> dict[str, Any]:
        return {
            "id": model.name,
            "object": "model",
            "created": self._created,
            "owned_by": model.owned_by,
        }

    async def _handle_models(self, request: web.Request) -> web.Response:
        data = [self._model_object(m) for m in self._models.values()]
        return _json_response(orjson.dumps({"object": "list", "data": data}), 200, _new_id("req_"))

    async def _handle_model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        model = self._models.get(name)
        if model is None:
            return _error_response(self._unknown_model(name), _new_id("req_"))
        return _json_response(orjson.dumps(self._model_object(model)), 200, _new_id("req_"))

    @staticmethod
    def _unknown_model(name: str) -> RequestError:
        return RequestError(
            404,
            f"The model `{name}` does not exist or you do not have access to it.",
            param="model",
            code="model_not_found",
        )

    async def _handle_chat(self, request: web.Request) -> web.StreamResponse:
        return await self.track(request, self._serve_chat, _new_id("req_"))

    async def track(
        self,
        request: web.Request,
        serve: Callable[[web.Request, SimRecord], Awaitable[web.StreamResponse]],
        request_id: str,
    ) -> web.StreamResponse:
        """Serve one request with ``serve`` under a new record: counted in flight (for
        :meth:`wait_idle`), its handler task known (for shutdown), and its outcome set even when
        it ends by a disconnect or an error. Every route of the simulator goes through here."""
        record = SimRecord(request_id=request_id, received_at=time.monotonic())
        self._records.append(record)
        task = asyncio.current_task()
        if task is not None:
            self._handler_tasks.add(task)
        self._in_flight += 1
        self._idle.clear()
        try:
            return await serve(request, record)
        except asyncio.CancelledError:
            if record.outcome is None:
                record.outcome = "error" if self._state == "closed" else "client_disconnected"
            raise
        except BaseException:
            if record.outcome is None:
                record.outcome = "error"
            raise
        finally:
            if record.finished_at is None:
                record.finished_at = time.monotonic()
            if task is not None:
                self._handler_tasks.discard(task)
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def _serve_chat(self, request: web.Request, record: SimRecord) -> web.StreamResponse:
        rid = record.request_id
        try:
            req = parse_request(await request.read())
            record.model = req.model
            record.stream = req.stream
            model = self._models.get(req.model)
            if model is None:
                raise self._unknown_model(req.model)
        except RequestError as exc:
            record.outcome = "error"
            record.status = exc.status
            return _error_response(exc, rid)

        forced, random_faults = self._forced_fault(req)
        occurrence = self._occurrences.bump((req.model, req.prompt_digest, req.sample))
        continuation = detect_continuation(
            req.messages,
            continue_final_message=req.continue_final_message,
            last_prefix=req.last_prefix,
            continue_trailing_assistant=model.continue_trailing_assistant,
        )
        cached_chars = 0
        cache: PrefixCache | None = None
        prompt = ""
        if model.prefix_cache:
            cache = self._caches.get(model.name)
            if cache is None:
                cache = self._caches[model.name] = PrefixCache()
            prompt = render_prompt(req.messages, open_last=continuation.kind == "prefill")
            cached_chars = cache.serve(prompt)
        plan = build_plan(
            model,
            req,
            seed=self.seed,
            occurrence=occurrence,
            fault=forced,
            random_faults=random_faults,
            continuation=continuation,
            cached_chars=cached_chars,
        )
        record._take_plan(plan, req.repeat_key, occurrence)

        if plan.refused:
            record.status, record.outcome = 400, "error"
            body = error_body(PREFILL_REFUSAL, "invalid_request_error", None, "messages")
            return _json_response(body, 400, rid)
        if plan.fault == "rate_limit":
            return self._refuse(record, 429, plan)
        if plan.fault == "server_error":
            return self._refuse(record, 500, plan)
        if plan.fault == "context_overflow":
            record.outcome = "fault:context_overflow"
            return await overflow_response(request, record, model, req, plan.prompt_tokens)
        if not model.sends_usage:
            req = replace(req, include_usage=False)
        completion_id = _new_id("chatcmpl-")
        try:
            if req.stream:
                return await self._stream(request, record, model, req, plan, completion_id)
            return await self._complete(request, record, model, req, plan, completion_id)
        finally:
            if cache is not None and record.completion_tokens:
                # What was generated stays cached after the prompt, as far as it got.
                generated = "".join(plan.tokens[: record.completion_tokens])
                if model.echo_prefill and continuation.kind == "prefill":
                    generated = generated[len(continuation.answer) :]
                cache.add(prompt + generated)

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

    def _refuse(self, record: SimRecord, status: int, plan: Plan) -> web.Response:
        record.status = status
        record.outcome = f"fault:{plan.fault}"
        if status == 429:
            retry = max(0.0, plan.retry_after_s)
            body = error_body(
                "Rate limit reached for requests. Please try again later.",
                "rate_limit_error",
                "rate_limit_exceeded",
            )
            headers = {
                "Retry-After": str(math.ceil(retry)),
                "retry-after-ms": str(round(retry * 1000)),
            }
            return _json_response(body, 429, record.request_id, headers)
        body = error_body(
            "The server had an error while processing your request.", "server_error", None
        )
        return _json_response(body, status, record.request_id)

    @contextlib.asynccontextmanager
    async def _slot(self, model: SimModel) -> AsyncIterator[None]:
        semaphore = self._slots.get(model.name)
        if semaphore is None:
            yield
            return
        async with semaphore:
            yield

    @staticmethod
    def _mark_start(record: SimRecord, plan: Plan) -> float:
        start = time.monotonic()
        record.queued_s = start - record.received_at
        record.scheduled_first_token_at = start + plan.first_offset
        record.scheduled_ttft_s = record.scheduled_first_token_at - record.received_at
        return start

    @staticmethod
    def _mark_done(record: SimRecord, plan: Plan) -> None:
        """Record a reply that went out in full: its finish reason, and its planned fault."""
        record.finish_reason = plan.finish_reason
        record.outcome = f"fault:{plan.fault_label}" if plan.fault_label else "complete"

    @staticmethod
    def _x_sim(record: SimRecord, first_token_at: float) -> dict[str, Any]:
        return {
            "request_id": record.request_id,
            "received_at": record.received_at,
            "queued_s": record.queued_s,
            "scheduled_first_token_at": record.scheduled_first_token_at,
            "scheduled_ttft_s": record.scheduled_ttft_s,
            "first_token_at": first_token_at,
        }

    async def _complete(
        self,
        request: web.Request,
        record: SimRecord,
        model: SimModel,
        req: ParsedRequest,
        plan: Plan,
        completion_id: str,
    ) -> web.StreamResponse:
        async with self._slot(model):
            start = self._mark_start(record, plan)
            if plan.fault in ("reset_mid", "error_frame"):
                await _sleep_until(start + plan.event_offset(plan.fault_at))
                record.outcome = f"fault:{plan.fault}"
                if plan.fault == "reset_mid":
                    _abort(request)
                    # Never reaches the client: the connection is gone.
                    return web.Response(status=500)
                record.status = 500
                body = error_body(
                    "The server had an error while processing your request.",
                    "server_error",
                    "internal_error",
                )
                return _json_response(body, 500, record.request_id)
            await _sleep_until(start + plan.end_offset)
        now = time.monotonic()
        record.first_token_sent_at = record.last_token_sent_at = now
        body = completion_body(
            completion_id=completion_id,
            created=self._created,
            model=req.model,
            text="".join(plan.tokens),
            finish_reason=plan.finish_reason,
            prompt_tokens=plan.prompt_tokens,
            completion_tokens=len(plan.tokens),
            x_sim=self._x_sim(record, now),
            cached_tokens=plan.cached_tokens,
        )
        if plan.fault == "malformed":
            body = body[: len(body) // 2]
        record.status = 200
        record.completion_tokens = len(plan.tokens)
        self._mark_done(record, plan)
        return _json_response(body, 200, record.request_id)

    async def _stream(
        self,
        request: web.Request,
        record: SimRecord,
        model: SimModel,
        req: ParsedRequest,
        plan: Plan,
        completion_id: str,
    ) -> web.StreamResponse:
        resp = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "x-request-id": record.request_id,
            },
        )
        self._active_streams += 1
        try:
            # Headers go out at once, as real servers do; the first token waits for the plan.
            await resp.prepare(request)
            record.status = 200
            if plan.keepalive:
                await resp.write(KEEPALIVE)
            async with self._slot(model):
                start = self._mark_start(record, plan)
                encoder = ChunkEncoder(completion_id, self._created, req.model, req.include_usage)
                await self._write_stream(request, resp, record, plan, encoder, start, req)
        except ConnectionError:
            # The write failed: the client is gone. Stop generating and say so.
            record.outcome = "client_disconnected"
        finally:
            self._active_streams -= 1
        return resp

    async def _wait(self, resp: web.StreamResponse, when: float, plan: Plan) -> None:
        """Sleep until ``when``; with keep-alive on, write a comment every interval meanwhile."""
        if plan.keepalive:
            interval = plan.keepalive_interval_s
            while when - time.monotonic() > interval:
                await asyncio.sleep(interval)
                await resp.write(KEEPALIVE)
        await _sleep_until(when)

    async def _write_stream(
        self,
        request: web.Request,
        resp: web.StreamResponse,
        record: SimRecord,
        plan: Plan,
        encoder: ChunkEncoder,
        start: float,
        req: ParsedRequest,
    ) -> None:
        tokens = plan.tokens
        n = len(tokens)
        times = [start + offset for offset in plan.offsets]
        end_at = start + plan.end_offset
        # Faults that act on the wire at token index ``k``; stalls are already in ``times``.
        fault = plan.fault if plan.fault in ("reset_mid", "malformed", "error_frame") else None
        k = plan.fault_at
        pending: list[bytes] = []
        keepalive = plan.keepalive
        after_finish = DONE
        if req.include_usage:
            after_finish = (
                encoder.usage(plan.prompt_tokens, n, cached_tokens=plan.cached_tokens) + DONE
            )
        tail_sent = False
        i = 0
        while True:
            if fault is not None and i == k:
                await self._wait(resp, start + plan.event_offset(k), plan)
                if fault == "reset_mid":
                    record.outcome = "fault:reset_mid"
                    _abort(request)
                    return
                if fault == "error_frame":
                    record.outcome = "fault:error_frame"
                    await resp.write(b"".join(pending) + error_frame())
                    await resp.write_eof()
                    return
                pending.append(encoder.malformed())
                fault = None
            if i >= n:
                break
            await self._wait(resp, times[i], plan)
            now = time.monotonic()
            # Coalesce every token already due into one write (up to a pending fault).
            limit = k if fault is not None else n
            j = i + 1
            while j < limit and times[j] <= now:
                j += 1
            parts, pending = pending, []
            if keepalive:
                parts.append(KEEPALIVE)
            if i == 0:
                record.first_token_sent_at = now
                parts.append(encoder.role())
                timing = {"x_sim": self._x_sim(record, now)}
                parts.append(encoder.content_with_extra(tokens[0], timing))
                parts.extend([encoder.content(t) for t in tokens[1:j]])
            else:
                parts.extend([encoder.content(t) for t in tokens[i:j]])
            if j == n and end_at <= now:
                parts.append(encoder.finish(plan.finish_reason))
                parts.append(after_finish)
                tail_sent = True
            await resp.write(b"".join(parts))
            record.last_token_sent_at = now
            record.completion_tokens = j
            i = j
        if not tail_sent:
            await self._wait(resp, end_at, plan)
            now = time.monotonic()
            parts = pending
            if keepalive:
                parts.append(KEEPALIVE)
            x_sim: dict[str, Any] | None = None
            if n == 0:
                # No content at all: the timing field rides on the finish chunk instead.
                record.first_token_sent_at = now
                parts.append(encoder.role())
                x_sim = {"x_sim": self._x_sim(record, now)}
            parts.append(encoder.finish(plan.finish_reason, x_sim))
            parts.append(after_finish)
            await resp.write(b"".join(parts))
        await resp.write_eof()
        self._mark_done(record, plan)
